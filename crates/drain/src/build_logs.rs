//! Build logs of published outputs, uploaded once the outputs are (`upload-logs`): read from Nix's
//! log directory (see [`nixpush_store::BuildLogs`]) by the daemon, never by the hook, which must
//! stay fast.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nixpush_cache::{Publisher, error_chain};
use nixpush_format::StorePath;
use nixpush_store::BuildLogs;

use crate::decide::{Failure, failure_of};
use crate::metrics::Metrics;

/// Uploads remembered, so that each output of a build (items of their own) does not upload the
/// build's one log again. Forgotten all at once past this: a repeated upload is only a PUT.
const REMEMBERED: usize = 10_000;

pub(crate) struct LogUploads {
    logs: Arc<BuildLogs>,
    metrics: Arc<Metrics>,
    /// By derivation and the time Nix wrote the log: a rebuild's new log is uploaded.
    sent: Mutex<HashSet<(StorePath, SystemTime)>>,
}

impl LogUploads {
    pub(crate) fn new(logs: BuildLogs, metrics: Arc<Metrics>) -> Self {
        LogUploads {
            logs: Arc::new(logs),
            metrics,
            sent: Mutex::new(HashSet::new()),
        }
    }

    /// Uploads the logs Nix kept of building `drvs`. A derivation without a log (its outputs were
    /// substituted, or `keep-build-log = false`) has nothing to upload; a log that cannot be read is
    /// reported and passed over, since trying again would not read it better. A failed upload is
    /// the attempt's failure: the item is tried again, outputs present, log still to go.
    pub(crate) async fn upload(
        &self,
        publisher: &Publisher,
        drvs: Vec<StorePath>,
        item: &str,
    ) -> Result<(), Failure> {
        let logs = self.logs.clone();
        let found = tokio::task::spawn_blocking(move || {
            drvs.into_iter()
                .filter_map(|drv| match logs.find(&drv) {
                    Ok(Some(log)) => Some(log),
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(%drv, error = %error_chain(&e), "cannot look for the build log; not uploaded");
                        None
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Failure::transient(format!("looking for build logs panicked: {e}")))?;
        for log in found {
            let key = (log.drv.clone(), log.modified);
            if self.sent().contains(&key) {
                continue;
            }
            let reading = log.clone();
            let text = match tokio::task::spawn_blocking(move || reading.read()).await {
                Ok(Ok(text)) => text,
                Ok(Err(e)) => {
                    tracing::warn!(drv = %log.drv, error = %error_chain(&e), "build log not uploaded");
                    continue;
                }
                Err(e) => {
                    return Err(Failure::transient(format!(
                        "reading the build log of {} panicked: {e}",
                        log.drv
                    )));
                }
            };
            let bytes = text.len();
            publisher.put_log(&log.drv, text).await.map_err(|e| {
                let f = failure_of(&e);
                Failure {
                    message: format!("cannot upload the build log of {}: {}", log.drv, f.message),
                    ..f
                }
            })?;
            tracing::info!(%item, drv = %log.drv, bytes, "build log uploaded");
            self.metrics.log_uploaded();
            let mut sent = self.sent();
            if sent.len() >= REMEMBERED {
                sent.clear();
            }
            sent.insert(key);
        }
        Ok(())
    }

    fn sent(&self) -> std::sync::MutexGuard<'_, HashSet<(StorePath, SystemTime)>> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}
