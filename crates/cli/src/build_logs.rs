//! `nixpush wait --logs`: the build logs written since a mark, uploaded by `wait` itself. No
//! post-build hook runs for a failed build, so the daemon never hears of it; yet its log is the
//! one a CI job most needs. A log is uploaded only for a derivation the store knows.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use nixpush_cache::{Cache, StoreUrl, error_chain};
use nixpush_format::StorePath;
use nixpush_store::{BuildLog, BuildLogs, Store, StoreAddress, StoreError};

/// Uploads at once.
const UPLOADS_IN_FLIGHT: usize = 16;

/// Which build logs `wait --logs` uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Which {
    /// None (the daemon still uploads the logs of what it publishes, with `upload-logs`)
    #[default]
    None,
    /// Those of derivations whose outputs are not all in the store: builds that failed
    Failed,
    /// Every log written since the mark
    All,
}

/// What `wait --logs` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogsDone {
    /// (derivation, whether its build failed)
    pub uploaded: Vec<(String, bool)>,
    /// (derivation, or the step that failed; why its log is not uploaded)
    pub errors: Vec<(String, String)>,
    /// Not uploaded, and not a failure: (derivation or directory, why): still building, a log
    /// too long or damaged, a directory of logs that cannot be read.
    pub skipped: Vec<(String, String)>,
}

/// Whether a derivation's log is wanted, and whether its build failed, from what the store says
/// of its outputs. `Ok(None)`: not wanted (a successful build with [`Which::Failed`], or a
/// derivation the store does not know: its log is never uploaded).
pub fn wanted(
    which: Which,
    outputs: &Result<(Vec<StorePath>, Vec<String>), StoreError>,
) -> Result<Option<bool>, String> {
    let failed = match outputs {
        Ok((_, missing)) => !missing.is_empty(),
        Err(StoreError::OutputNotBuilt { .. }) => true,
        Err(StoreError::NotValid(_)) => return Ok(None),
        Err(e) => return Err(error_chain(e)),
    };
    Ok(match which {
        Which::None => None,
        Which::Failed if !failed => None,
        Which::Failed | Which::All => Some(failed),
    })
}

/// Uploads the logs `which` asks for among those written at or after `since_ms` (Unix ms), until
/// `deadline`. `store`: the local store's address (None: `$NIX_REMOTE`, else auto).
pub async fn upload(
    url: &StoreUrl,
    store: Option<String>,
    which: Which,
    since_ms: i64,
    deadline: Instant,
) -> LogsDone {
    let mut done = LogsDone::default();
    if which == Which::None {
        return done;
    }
    let since = SystemTime::UNIX_EPOCH + Duration::from_millis(since_ms.max(0) as u64);
    let choosing = tokio::task::spawn_blocking(move || choose(store, which, since));
    let logs = match tokio::time::timeout_at(deadline.into(), choosing).await {
        Ok(Ok(Ok(chosen))) => {
            done.errors = chosen.errors;
            done.skipped = chosen.skipped;
            chosen.logs
        }
        Ok(Ok(Err(e))) => {
            done.errors.push(("build logs".into(), format!("{e:#}")));
            return done;
        }
        Ok(Err(e)) => {
            done.errors
                .push(("build logs".into(), format!("choosing logs panicked: {e}")));
            return done;
        }
        Err(_) => {
            done.errors.push((
                "build logs".into(),
                "the store was not asked about every log by the deadline".into(),
            ));
            return done;
        }
    };
    if logs.is_empty() {
        return done;
    }
    let opened = tokio::time::timeout_at(deadline.into(), Cache::open(url.clone())).await;
    let cache = match opened {
        Ok(Ok(c)) => Arc::new(c),
        Ok(Err(e)) => {
            let why = format!("cannot open the cache: {}", error_chain(&e));
            done.errors
                .extend(logs.iter().map(|(l, _)| (l.drv.to_string(), why.clone())));
            return done;
        }
        Err(_) => {
            done.errors.extend(
                logs.iter()
                    .map(|(l, _)| (l.drv.to_string(), "not uploaded by the deadline".into())),
            );
            return done;
        }
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(UPLOADS_IN_FLIGHT));
    let mut uploads = tokio::task::JoinSet::new();
    for (log, failed) in logs {
        let (cache, limit) = (cache.clone(), limit.clone());
        uploads.spawn(async move {
            let drv = log.drv.to_string();
            let put = async {
                let _permit = limit.acquire_owned().await;
                let reading = log.clone();
                let text = match tokio::task::spawn_blocking(move || reading.read()).await {
                    Ok(Ok(text)) => text,
                    Ok(Err(e)) if !e.transient() => return Sent::Skipped(error_chain(&e)),
                    Ok(Err(e)) => return Sent::Failed(error_chain(&e)),
                    Err(e) => return Sent::Failed(format!("reading it panicked: {e}")),
                };
                match cache.put_log(&log.drv, text).await {
                    Ok(()) => Sent::Uploaded,
                    Err(e) => Sent::Failed(format!("cannot upload it: {}", error_chain(&e))),
                }
            };
            let sent = tokio::time::timeout_at(deadline.into(), put)
                .await
                .unwrap_or_else(|_| Sent::Failed("not uploaded by the deadline".into()));
            (drv, failed, sent)
        });
    }
    while let Some(joined) = uploads.join_next().await {
        match joined {
            Ok((drv, failed, Sent::Uploaded)) => done.uploaded.push((drv, failed)),
            Ok((drv, _, Sent::Skipped(why))) => done.skipped.push((drv, why)),
            Ok((drv, _, Sent::Failed(why))) => done.errors.push((drv, why)),
            Err(e) => done
                .errors
                .push(("build logs".into(), format!("an upload panicked: {e}"))),
        }
    }
    done.uploaded.sort();
    done.errors.sort();
    done.skipped.sort();
    done
}

/// How one log's upload ended.
enum Sent {
    Uploaded,
    Skipped(String),
    Failed(String),
}

/// What [`choose`] found.
struct Chosen {
    /// Each with whether its build failed.
    logs: Vec<(BuildLog, bool)>,
    /// The derivations the store could not be asked about.
    errors: Vec<(String, String)>,
    skipped: Vec<(String, String)>,
}

/// The logs written since `since` that `which` wants. A build still running (its outputs not
/// valid yet) has not failed: its log is skipped.
fn choose(store: Option<String>, which: Which, since: SystemTime) -> Result<Chosen> {
    let logs = BuildLogs::system();
    let listing = logs
        .modified_since(since)
        .with_context(|| format!("cannot list the build logs in {}", logs.dir().display()))?;
    let mut chosen = Chosen {
        logs: Vec::new(),
        errors: Vec::new(),
        skipped: listing
            .unreadable
            .iter()
            .map(|e| ("build logs".to_owned(), error_chain(e)))
            .collect(),
    };
    if listing.logs.is_empty() {
        return Ok(chosen);
    }
    let address = StoreAddress::resolve(store.as_deref())?;
    let store = Store::open(address).context("cannot open the Nix store to tell failed builds")?;
    for log in listing.logs {
        let drv = log.drv.to_string();
        match wanted(which, &store.built_outputs(&log.drv)) {
            Ok(Some(true)) if nixpush_store::building(&log.drv).unwrap_or(true) => chosen
                .skipped
                .push((drv, "still building (or its outputs cannot be read)".into())),
            Ok(Some(failed)) => chosen.logs.push((log, failed)),
            Ok(None) => {}
            Err(why) => chosen.errors.push((drv, why)),
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> StorePath {
        format!("/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-{name}")
            .parse()
            .unwrap()
    }

    #[test]
    fn failed_builds_are_those_with_outputs_missing_and_unknown_derivations_never_count() {
        let built = Ok((vec![path("out")], vec![]));
        let partly = Ok((vec![path("out")], vec!["dev".to_owned()]));
        let none = Err(StoreError::OutputNotBuilt {
            drv: path("x.drv"),
            output: "out".into(),
        });
        let unknown = Err(StoreError::NotValid(path("x.drv")));
        assert_eq!(wanted(Which::Failed, &built), Ok(None));
        assert_eq!(wanted(Which::All, &built), Ok(Some(false)));
        assert_eq!(wanted(Which::Failed, &partly), Ok(Some(true)));
        assert_eq!(wanted(Which::Failed, &none), Ok(Some(true)));
        assert_eq!(wanted(Which::None, &none), Ok(None));
        assert_eq!(wanted(Which::All, &unknown), Ok(None));
        assert_eq!(wanted(Which::Failed, &unknown), Ok(None));
        let broken = Err(StoreError::Protocol("cut".into()));
        assert!(wanted(Which::All, &broken).unwrap_err().contains("cut"));
    }
}
