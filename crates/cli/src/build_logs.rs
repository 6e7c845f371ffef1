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
    let chosen = tokio::task::spawn_blocking(move || choose(store, which, since)).await;
    let logs = match chosen {
        Ok(Ok((logs, errors))) => {
            done.errors = errors;
            logs
        }
        Ok(Err(e)) => {
            done.errors.push(("build logs".into(), format!("{e:#}")));
            return done;
        }
        Err(e) => {
            done.errors
                .push(("build logs".into(), format!("choosing logs panicked: {e}")));
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
                let text = tokio::task::spawn_blocking(move || reading.read())
                    .await
                    .map_err(|e| format!("reading it panicked: {e}"))?
                    .map_err(|e| error_chain(&e))?;
                cache
                    .put_log(&log.drv, text)
                    .await
                    .map_err(|e| format!("cannot upload it: {}", error_chain(&e)))
            };
            match tokio::time::timeout_at(deadline.into(), put).await {
                Ok(Ok(())) => Ok((drv, failed)),
                Ok(Err(why)) => Err((drv, why)),
                Err(_) => Err((drv, "not uploaded by the deadline".into())),
            }
        });
    }
    while let Some(joined) = uploads.join_next().await {
        match joined {
            Ok(Ok(up)) => done.uploaded.push(up),
            Ok(Err(e)) => done.errors.push(e),
            Err(e) => done
                .errors
                .push(("build logs".into(), format!("an upload panicked: {e}"))),
        }
    }
    done.uploaded.sort();
    done.errors.sort();
    done
}

/// The logs written since `since` that `which` wants, each with whether its build failed; and
/// the derivations the store could not be asked about.
#[allow(clippy::type_complexity)]
fn choose(
    store: Option<String>,
    which: Which,
    since: SystemTime,
) -> Result<(Vec<(BuildLog, bool)>, Vec<(String, String)>)> {
    let logs = BuildLogs::system();
    let written = logs
        .modified_since(since)
        .with_context(|| format!("cannot list the build logs in {}", logs.dir().display()))?;
    if written.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let address = StoreAddress::resolve(store.as_deref())?;
    let store = Store::open(address).context("cannot open the Nix store to tell failed builds")?;
    let (mut chosen, mut errors) = (Vec::new(), Vec::new());
    for log in written {
        match wanted(which, &store.built_outputs(&log.drv)) {
            Ok(Some(failed)) => chosen.push((log, failed)),
            Ok(None) => {}
            Err(why) => errors.push((log.drv.to_string(), why)),
        }
    }
    Ok((chosen, errors))
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
