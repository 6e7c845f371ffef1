//! Build logs of published outputs, uploaded once the outputs are (`upload-logs`): read from Nix's
//! log directory (see [`nixpush_store::BuildLogs`]) by the daemon, never by the hook, which must
//! stay fast.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nixpush_cache::{Publisher, error_chain};
use nixpush_format::StorePath;
use nixpush_store::{BuildLog, BuildLogs, Store};

use crate::decide::{Failure, failure_of};
use crate::metrics::Metrics;

/// How long an upload is remembered, so that the outputs of one build (items of their own, often
/// attempted together) upload its one log once. Short: a cache that lost the log gets it again when
/// the outputs are pushed again.
const REMEMBER_FOR: Duration = Duration::from_secs(600);

/// Failure classes (see [`crate::decide::class_of`]) that pass by themselves: the item is tried
/// again for its log. Any other (access denied to `log/*`, a refused request) would fail every
/// attempt until the item gave up, its outputs long published: the log is skipped instead.
const PASSING: [&str; 3] = ["throttle", "network", "server"];

pub(crate) struct LogUploads {
    logs: Arc<BuildLogs>,
    metrics: Arc<Metrics>,
    /// Logs uploaded or being uploaded, by derivation and the time Nix wrote them (a rebuild's new
    /// log is another), with when.
    sent: Mutex<HashMap<(StorePath, SystemTime), Instant>>,
}

impl LogUploads {
    pub(crate) fn new(logs: BuildLogs, metrics: Arc<Metrics>) -> Self {
        LogUploads {
            logs: Arc::new(logs),
            metrics,
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// Uploads the logs Nix kept of building `drvs`, those the store knows. A derivation without
    /// a log (its outputs were substituted, or `keep-build-log = false`) has nothing to upload; a
    /// log that is damaged or too long is reported and skipped. A failure that passes (the disk,
    /// the network, the server) is the attempt's: the item is tried again, outputs present, log
    /// still to go.
    pub(crate) async fn upload(
        &self,
        store: &Arc<Store>,
        publisher: &Publisher,
        drvs: Vec<StorePath>,
        item: &str,
    ) -> Result<(), Failure> {
        let (logs, store) = (self.logs.clone(), store.clone());
        let found = tokio::task::spawn_blocking(move || find(&logs, &store, drvs))
            .await
            .map_err(|e| Failure::transient(format!("looking for build logs panicked: {e}")))??;
        for log in found {
            let Some(key) = self.claim(&log) else {
                continue;
            };
            let uploaded = self.upload_one(publisher, &log, item).await;
            if !matches!(uploaded, Ok(true)) {
                self.sent().remove(&key);
            }
            uploaded?;
        }
        Ok(())
    }

    /// Whether the log was uploaded (else skipped, and said why).
    async fn upload_one(
        &self,
        publisher: &Publisher,
        log: &BuildLog,
        item: &str,
    ) -> Result<bool, Failure> {
        let reading = log.clone();
        let text = match tokio::task::spawn_blocking(move || reading.read()).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) if e.transient() => {
                return Err(Failure::transient(error_chain(&e)));
            }
            Ok(Err(e)) => {
                tracing::warn!(drv = %log.drv, error = %error_chain(&e), "build log not uploaded");
                self.metrics.log_skipped();
                return Ok(false);
            }
            Err(e) => {
                return Err(Failure::transient(format!(
                    "reading the build log of {} panicked: {e}",
                    log.drv
                )));
            }
        };
        let bytes = text.len();
        if let Err(e) = publisher.put_log(&log.drv, text).await {
            let f = failure_of(&e);
            let message = format!("cannot upload the build log of {}: {}", log.drv, f.message);
            if PASSING.contains(&f.class) {
                return Err(Failure { message, ..f });
            }
            tracing::warn!(%item, error = %message, "build log skipped; the outputs are published");
            self.metrics.log_skipped();
            return Ok(false);
        }
        tracing::info!(%item, drv = %log.drv, bytes, "build log uploaded");
        self.metrics.log_uploaded();
        Ok(true)
    }

    /// Takes `log` in hand, unless it was uploaded lately or another item has it in hand.
    fn claim(&self, log: &BuildLog) -> Option<(StorePath, SystemTime)> {
        let key = (log.drv.clone(), log.modified);
        let mut sent = self.sent();
        sent.retain(|_, at| at.elapsed() < REMEMBER_FOR);
        if sent.contains_key(&key) {
            return None;
        }
        sent.insert(key.clone(), Instant::now());
        Some(key)
    }

    fn sent(&self) -> std::sync::MutexGuard<'_, HashMap<(StorePath, SystemTime), Instant>> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The logs of those of `drvs` that the store knows (a deriver recorded for a path may be gone, or
/// never have been built here).
fn find(logs: &BuildLogs, store: &Store, drvs: Vec<StorePath>) -> Result<Vec<BuildLog>, Failure> {
    if drvs.is_empty() {
        return Ok(Vec::new());
    }
    let known = store
        .with_connection(|c| c.query_valid_paths(&drvs))
        .map_err(|e| Failure {
            class: "store",
            ..Failure::transient(format!(
                "cannot ask the store about derivations: {}",
                error_chain(&e)
            ))
        })?;
    let mut found = Vec::new();
    for drv in known {
        match logs.find(&drv) {
            Ok(Some(log)) => found.push(log),
            Ok(None) => {}
            Err(e) => return Err(Failure::transient(error_chain(&e))),
        }
    }
    Ok(found)
}
