//! The daemon's decisions, as pure functions of what happened: what a store error means for an
//! item, which cache errors are permanent, which failure is the root cause, when to try again, and
//! so how each attempt on an item ends.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nixpush_cache::{CacheError, error_chain};
use nixpush_format::StorePath;
use nixpush_queue::{Claimed, Decision, Outcome, RetryPolicy};
use nixpush_store::StoreError;

/// Why an attempt on an item failed, as the retry decision needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub message: String,
    /// Trying again cannot help (a corrupt store path).
    pub permanent: bool,
    /// The server asked for this wait (S3's `Retry-After`).
    pub retry_after: Option<Duration>,
    /// For the retry metric: throttle, network, auth, server, corrupt, store or other.
    pub class: &'static str,
}

impl Failure {
    pub fn transient(message: String) -> Self {
        Failure {
            message,
            permanent: false,
            retry_after: None,
            class: "other",
        }
    }
}

/// What a store error means for the item it happened to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreVerdict {
    /// The path is no longer in the store: nothing to upload, ever.
    Gone,
    /// Try the item again later; the connection to the daemon is fine.
    Retry,
    /// Try again later on a new connection: this one may be out of step with the daemon.
    Reconnect,
}

pub fn store_verdict(e: &StoreError) -> StoreVerdict {
    match e {
        StoreError::NotValid(_) | StoreError::OutputNotBuilt { .. } => StoreVerdict::Gone,
        StoreError::Io(_)
        | StoreError::Connect { .. }
        | StoreError::Protocol(_)
        | StoreError::Nar { .. } => StoreVerdict::Reconnect,
        StoreError::Daemon(_)
        | StoreError::Spawn(_)
        | StoreError::UnsupportedVersion(_)
        | StoreError::UnsupportedStore(_)
        | StoreError::UnsupportedParameters { .. } => StoreVerdict::Retry,
    }
}

pub fn failure_of(e: &CacheError) -> Failure {
    Failure {
        message: error_chain(e),
        // A corrupt store path stays corrupt; everything else (network, server, credentials being
        // fixed, a reference that failed for such a reason) may pass.
        permanent: matches!(e, CacheError::NarMismatch { .. }),
        retry_after: match e {
            CacheError::Throttled { retry_after, .. } => retry_after.map(Duration::from_secs),
            _ => None,
        },
        class: class_of(e),
    }
}

/// The kind of trouble a cache error is, as the retry metric counts it.
pub fn class_of(e: &CacheError) -> &'static str {
    match e {
        CacheError::Throttled { .. } => "throttle",
        CacheError::Unreachable { .. } | CacheError::Http { .. } => "network",
        CacheError::AccessDenied { .. }
        | CacheError::NoCredentials { .. }
        | CacheError::HttpDenied { .. }
        | CacheError::WrongRegion { .. }
        | CacheError::BadBucketName { .. }
        | CacheError::NoSuchBucket { .. } => "auth",
        CacheError::S3 {
            status: Some(500..=599),
            ..
        } => "server",
        CacheError::NarMismatch { .. } | CacheError::SpoolChanged { .. } => "corrupt",
        CacheError::Source { .. } => "store",
        _ => "other",
    }
}

/// Follows "its reference … could not be published" to the path that actually failed.
pub fn root_cause(path: &StorePath, failed: &HashMap<StorePath, Arc<CacheError>>) -> Failure {
    let mut cur = path;
    for _ in 0..failed.len() + 1 {
        match failed.get(cur).map(|e| &**e) {
            Some(CacheError::ReferenceFailed { reference, .. })
                if failed.contains_key(reference) =>
            {
                cur = reference
            }
            Some(e) if cur == path => return failure_of(e),
            Some(e) => {
                let mut f = failure_of(e);
                f.message = format!("its dependency {cur} failed: {}", f.message);
                return f;
            }
            None => break,
        }
    }
    Failure::transient(format!("{path} was not published"))
}

/// How a failed attempt on `c` ends: queued again after a backoff, or failed for good (a permanent
/// failure, or retried for as long as the policy allows). `unit` is uniform in [0, 1), for jitter.
pub fn retry(policy: &RetryPolicy, c: &Claimed, f: Failure, unit: f64) -> Outcome {
    if f.permanent {
        return Outcome::Failed(f.message);
    }
    match policy.decide(c.attempts + 1, c.retry_waited, f.retry_after, unit) {
        Decision::RetryIn(ms) => Outcome::RetryIn {
            wait: Duration::from_millis(ms),
            error: f.message,
        },
        Decision::GiveUp => Outcome::Failed(format!(
            "gave up after {} attempts and {:#} of waits: {}",
            c.attempts + 1,
            indicatif::HumanDuration(c.retry_waited),
            f.message
        )),
    }
}

/// What one attempt at an item produced.
pub struct Attempt<'a> {
    /// The paths the item stands for (itself, or a derivation's outputs), or why they are unknown.
    pub resolved: &'a Result<Vec<StorePath>, StoreError>,
    /// Paths published, present or left to an upstream cache.
    pub ok: &'a HashSet<StorePath>,
    /// Paths that failed, with why.
    pub failed: &'a HashMap<StorePath, Arc<CacheError>>,
    /// A failure of the attempt before any path was tried (the closure could not be computed, the
    /// cache not opened).
    pub error: Option<&'a Failure>,
    /// The build logs could not be uploaded, after the paths were.
    pub logs: Option<&'a Failure>,
}

/// How the attempt ended for `c`; `retry` decides the failed ones (see [`retry`]).
pub fn outcome(
    c: &Claimed,
    a: &Attempt<'_>,
    retry: impl Fn(&Claimed, Failure) -> Outcome,
) -> Outcome {
    match a.resolved {
        Err(e) if store_verdict(e) == StoreVerdict::Gone => Outcome::Gone(error_chain(e)),
        Err(e) => retry(
            c,
            Failure {
                class: "store",
                ..Failure::transient(error_chain(e))
            },
        ),
        Ok(_) if a.error.is_some() => retry(c, a.error.cloned().expect("checked")),
        Ok(roots) => match roots.iter().find(|p| !a.ok.contains(p)) {
            None => match a.logs {
                None => Outcome::Done,
                Some(f) => retry(c, f.clone()),
            },
            Some(p) if a.failed.contains_key(p) => retry(c, root_cause(p, a.failed)),
            Some(p) => retry(c, Failure::transient(format!("{p} was not published"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixpush_format::Sha256;
    use nixpush_queue::{Item, Kind};

    fn path(name: &str) -> StorePath {
        format!("/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-{name}")
            .parse()
            .unwrap()
    }

    fn claimed(attempts: u32, waited: Duration) -> Claimed {
        Claimed {
            id: 1,
            item: Item {
                name: path("item").to_string(),
                kind: Kind::Path,
            },
            attempts,
            enqueued_at: 0,
            retry_waited: waited,
        }
    }

    fn s3_error(status: u16) -> CacheError {
        CacheError::S3 {
            operation: "PUT",
            key: "k".into(),
            message: "InternalError".into(),
            status: Some(status),
        }
    }

    #[test]
    fn store_errors_mean_gone_retry_or_reconnect() {
        let io = || std::io::Error::other("reset");
        assert_eq!(
            store_verdict(&StoreError::NotValid(path("x"))),
            StoreVerdict::Gone
        );
        assert_eq!(
            store_verdict(&StoreError::OutputNotBuilt {
                drv: path("x.drv"),
                output: "out".into()
            }),
            StoreVerdict::Gone
        );
        assert_eq!(
            store_verdict(&StoreError::Io(io())),
            StoreVerdict::Reconnect
        );
        assert_eq!(
            store_verdict(&StoreError::Protocol("eof".into())),
            StoreVerdict::Reconnect
        );
        assert_eq!(
            store_verdict(&StoreError::Connect {
                socket: "/s".into(),
                source: io()
            }),
            StoreVerdict::Reconnect
        );
        // "path is not valid" from an old daemon, or a database busy: the connection is fine.
        assert_eq!(
            store_verdict(&StoreError::Daemon("database is busy".into())),
            StoreVerdict::Retry
        );
    }

    #[test]
    fn only_a_corrupt_path_is_permanent_and_throttling_keeps_its_wait() {
        let corrupt = CacheError::NarMismatch {
            path: path("x"),
            recorded_hash: Sha256([0; 32]),
            recorded_size: 1,
            actual_hash: Sha256([1; 32]),
            actual_size: 2,
        };
        assert!(failure_of(&corrupt).permanent);
        for e in [
            s3_error(500),
            CacheError::AccessDenied {
                bucket: "b".into(),
                code: "AccessDenied".into(),
            },
            CacheError::Unreachable {
                endpoint: "e".into(),
                message: "refused".into(),
            },
        ] {
            let f = failure_of(&e);
            assert!(!f.permanent && f.retry_after.is_none(), "{f:?}");
        }
        let throttled = CacheError::Throttled {
            key: "k".into(),
            code: "SlowDown".into(),
            retry_after: Some(7),
        };
        assert_eq!(
            failure_of(&throttled).retry_after,
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn the_root_cause_is_the_dependency_that_failed_itself() {
        let (top, mid, bottom) = (path("top"), path("mid"), path("bottom"));
        let failed: HashMap<StorePath, Arc<CacheError>> = [
            (
                top.clone(),
                CacheError::ReferenceFailed {
                    path: top.clone(),
                    reference: mid.clone(),
                },
            ),
            (
                mid.clone(),
                CacheError::ReferenceFailed {
                    path: mid.clone(),
                    reference: bottom.clone(),
                },
            ),
            (
                bottom.clone(),
                CacheError::Throttled {
                    key: "k".into(),
                    code: "SlowDown".into(),
                    retry_after: Some(3),
                },
            ),
        ]
        .into_iter()
        .map(|(p, e)| (p, Arc::new(e)))
        .collect();
        let f = root_cause(&top, &failed);
        assert!(
            f.message
                .starts_with(&format!("its dependency {bottom} failed: S3 is throttling")),
            "{}",
            f.message
        );
        assert_eq!(f.retry_after, Some(Duration::from_secs(3)));
        assert!(
            root_cause(&bottom, &failed)
                .message
                .starts_with("S3 is throttling")
        );
        assert_eq!(
            root_cause(&path("other"), &failed).message,
            format!("{} was not published", path("other"))
        );
    }

    #[test]
    fn retries_back_off_then_give_up_and_permanent_failures_end_at_once() {
        let policy = RetryPolicy::default();
        match retry(
            &policy,
            &claimed(0, Duration::ZERO),
            Failure::transient("down".into()),
            0.5,
        ) {
            Outcome::RetryIn { wait, error } => {
                assert_eq!(error, "down");
                assert!(wait <= policy.base_delay, "{wait:?}");
            }
            o => panic!("{o:?}"),
        }
        let spent = claimed(300, policy.give_up_after);
        match retry(&policy, &spent, Failure::transient("down".into()), 0.5) {
            Outcome::Failed(m) => {
                assert!(
                    m == "gave up after 301 attempts and 24h of waits: down",
                    "{m}"
                )
            }
            o => panic!("{o:?}"),
        }
        let permanent = Failure {
            permanent: true,
            ..Failure::transient("corrupt".into())
        };
        assert_eq!(
            retry(&policy, &claimed(0, Duration::ZERO), permanent, 0.5),
            Outcome::Failed("corrupt".into())
        );
    }

    #[test]
    fn an_item_is_done_only_when_all_its_paths_are_published() {
        let (a, b) = (path("a"), path("b"));
        let ok: HashSet<StorePath> = [a.clone()].into_iter().collect();
        let failed: HashMap<StorePath, Arc<CacheError>> =
            [(b.clone(), Arc::new(s3_error(500)))].into_iter().collect();
        let retry_any = |_: &Claimed, f: Failure| Outcome::RetryIn {
            wait: Duration::ZERO,
            error: f.message,
        };
        let c = claimed(0, Duration::ZERO);
        let run_with_logs = |resolved: Result<Vec<StorePath>, StoreError>,
                             error: Option<&Failure>,
                             logs: Option<&Failure>| {
            let attempt = Attempt {
                resolved: &resolved,
                ok: &ok,
                failed: &failed,
                error,
                logs,
            };
            outcome(&c, &attempt, retry_any)
        };
        let run = |resolved, error| run_with_logs(resolved, error, None);
        assert_eq!(run(Ok(vec![a.clone()]), None), Outcome::Done);
        match run(Ok(vec![a.clone(), b.clone()]), None) {
            Outcome::RetryIn { error, .. } => assert!(error.contains("HTTP 500"), "{error}"),
            o => panic!("{o:?}"),
        }
        match run(Ok(vec![path("c")]), None) {
            Outcome::RetryIn { error, .. } => assert!(error.ends_with("was not published")),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            run(Err(StoreError::NotValid(a.clone())), None),
            Outcome::Gone(_)
        ));
        let unreachable = Failure::transient("cache unreachable".into());
        assert_eq!(
            run(Ok(vec![a.clone()]), Some(&unreachable)),
            Outcome::RetryIn {
                wait: Duration::ZERO,
                error: "cache unreachable".into()
            }
        );
        // Published, but not its log: tried again (the paths are present then).
        let log = Failure::transient("cannot upload the build log".into());
        assert_eq!(
            run_with_logs(Ok(vec![a.clone()]), None, Some(&log)),
            Outcome::RetryIn {
                wait: Duration::ZERO,
                error: "cannot upload the build log".into()
            }
        );
        // A log is never the reason when a path failed.
        match run_with_logs(Ok(vec![b.clone()]), None, Some(&log)) {
            Outcome::RetryIn { error, .. } => assert!(error.contains("HTTP 500"), "{error}"),
            o => panic!("{o:?}"),
        }
    }
}
