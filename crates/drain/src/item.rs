//! One attempt at one item: resolve it to store paths, compute its closure up to what the cache is
//! known to hold, publish that, and decide how the attempt ended (see [`crate::decide`]). Items run
//! concurrently and independently: they share the store's connections, the cache's publisher (which
//! uploads a path that several want once) and nothing else.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixpush_cache::{Cache, CacheError, Event, NarSource, PushOptions, error_chain};
use nixpush_format::StorePath;
use nixpush_queue::{Claimed, Kind, Outcome};
use nixpush_store::{Store, StoreAddress, StoreError};
use tokio::sync::{Mutex, Semaphore};

use crate::Settings;
use crate::build_logs::LogUploads;
use crate::decide::{self, Failure, StoreVerdict, failure_of, store_verdict};
use crate::metrics::Metrics;
use crate::source::StoreSource;

/// Items reading the store (resolving, walking the closure) at once. The walk of one item already
/// uses a few connections; more items at once would only queue at the nix-daemon.
const RESOLVING: usize = 8;
/// Connections one closure walk uses at once.
const WALK_CONNECTIONS: usize = 4;
/// A failure to open the store or the cache is the answer for the items that asked meanwhile and
/// for this long after, so that items claimed together do not each wait for the same dead
/// endpoint.
const FAILURE_HOLDS: Duration = Duration::from_secs(1);

/// What every attempt shares.
pub(crate) struct Attempts {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    store: Opened<Arc<Store>>,
    publisher: Opened<nixpush_cache::Publisher>,
    resolving: Semaphore,
    /// With `upload-logs`.
    logs: Option<LogUploads>,
}

/// Something opened on first use, one opening at a time (see [`FAILURE_HOLDS`]).
struct Opened<T>(Mutex<Slot<T>>);

enum Slot<T> {
    Closed,
    Open(T),
    Failed(Instant, Failure),
}

impl<T: Clone> Opened<T> {
    fn new() -> Self {
        Opened(Mutex::new(Slot::Closed))
    }

    async fn get<F: Future<Output = Result<T, Failure>>>(
        &self,
        open: impl FnOnce() -> F,
    ) -> Result<T, Failure> {
        let mut slot = self.0.lock().await;
        match &*slot {
            Slot::Open(t) => return Ok(t.clone()),
            Slot::Failed(at, f) if at.elapsed() < FAILURE_HOLDS => return Err(f.clone()),
            _ => {}
        }
        match open().await {
            Ok(t) => {
                *slot = Slot::Open(t.clone());
                Ok(t)
            }
            Err(f) => {
                *slot = Slot::Failed(Instant::now(), f.clone());
                Err(f)
            }
        }
    }
}

impl Attempts {
    pub(crate) fn new(settings: Arc<Settings>, metrics: Arc<Metrics>) -> Self {
        Attempts {
            store: Opened::new(),
            publisher: Opened::new(),
            resolving: Semaphore::new(RESOLVING),
            logs: settings
                .build_logs
                .clone()
                .map(|l| LogUploads::new(l, metrics.clone())),
            settings,
            metrics,
        }
    }

    /// One attempt at `c`; returns it with how the attempt ended.
    pub(crate) async fn attempt(self: Arc<Self>, c: Claimed) -> (Claimed, Outcome) {
        let outcome = self.outcome(&c).await;
        if matches!(outcome, Outcome::Gone(_)) {
            tracing::info!(item = %c.item.name, "gone from the store; nothing to upload");
        }
        (c, outcome)
    }

    async fn outcome(&self, c: &Claimed) -> Outcome {
        let store = match self.store().await {
            Ok(s) => s,
            Err(f) => return self.retry(c, f),
        };
        let reading = self.resolving.acquire().await.expect("semaphore closed");
        let (name, kind) = (c.item.name.clone(), c.item.kind);
        let resolving = store.clone();
        let resolved = tokio::task::spawn_blocking(move || resolve(&resolving, &name, kind))
            .await
            .unwrap_or_else(|e| Err(StoreError::Protocol(format!("resolving panicked: {e}"))));
        let roots = match &resolved {
            Ok(roots) => roots.clone(),
            Err(e) => {
                if store_verdict(e) == StoreVerdict::Reconnect {
                    store.drop_idle();
                }
                return self.decide(c, &resolved, &Default::default(), &Default::default(), None);
            }
        };
        let publisher = match self.publisher(&store).await {
            Ok(p) => p,
            Err(f) => {
                return self.decide(
                    c,
                    &resolved,
                    &Default::default(),
                    &Default::default(),
                    Some(f),
                );
            }
        };
        // Past a path the cache is known to hold, its closure is there too: not walked, not probed.
        let (walking, known, fresh) = (store.clone(), publisher.clone(), roots.clone());
        let closure = tokio::task::spawn_blocking(move || {
            walking.closure(&roots, WALK_CONNECTIONS, |p| known.is_known(p))
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Protocol(format!("closure walk panicked: {e}"))));
        drop(reading);
        let closure = match closure {
            Ok(c) => c,
            Err(e) => {
                if store_verdict(&e) == StoreVerdict::Reconnect {
                    store.drop_idle();
                }
                let f = Failure {
                    class: "store",
                    ..Failure::transient(format!("cannot compute the closure: {}", error_chain(&e)))
                };
                return self.decide(
                    c,
                    &resolved,
                    &Default::default(),
                    &Default::default(),
                    Some(f),
                );
            }
        };
        let derivers: Vec<StorePath> = match c.item.kind {
            Kind::Derivation => c.item.name.parse().into_iter().collect(),
            Kind::Path => fresh
                .iter()
                .filter_map(|p| closure.get(p)?.deriver.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        let item = c.item.name.clone();
        // The item's own paths are asked about all the same: they were just built (again), and
        // may have been removed from the cache since it was last asked.
        let summary = publisher
            .push(closure.into_values().collect(), &fresh, &move |e| {
                log_event(&item, e)
            })
            .await;
        self.metrics.uploaded(summary.file_bytes);
        let ok: HashSet<StorePath> = summary
            .uploaded
            .into_iter()
            .chain(summary.present)
            .chain(summary.skipped)
            .collect();
        let failed: HashMap<StorePath, Arc<CacheError>> = summary.failed.into_iter().collect();
        let logs = match &self.logs {
            Some(logs) if fresh.iter().all(|p| ok.contains(p)) => logs
                .upload(&store, &publisher, derivers, &c.item.name)
                .await
                .err(),
            _ => None,
        };
        let attempt = decide::Attempt {
            resolved: &resolved,
            ok: &ok,
            failed: &failed,
            error: None,
            logs: logs.as_ref(),
        };
        decide::outcome(c, &attempt, |c, f| self.retry(c, f))
    }

    fn decide(
        &self,
        c: &Claimed,
        resolved: &Result<Vec<StorePath>, StoreError>,
        ok: &HashSet<StorePath>,
        failed: &HashMap<StorePath, Arc<CacheError>>,
        error: Option<Failure>,
    ) -> Outcome {
        let attempt = decide::Attempt {
            resolved,
            ok,
            failed,
            error: error.as_ref(),
            logs: None,
        };
        decide::outcome(c, &attempt, |c, f| self.retry(c, f))
    }

    pub(crate) fn retry(&self, c: &Claimed, f: Failure) -> Outcome {
        // Full jitter needs a uniform number in [0, 1): the top 53 bits of a random u64.
        let unit = getrandom::u64().map_or(0.5, |r| (r >> 11) as f64 / (1u64 << 53) as f64);
        let class = f.class;
        let outcome = decide::retry(&self.settings.retry, c, f, unit);
        match &outcome {
            Outcome::RetryIn { wait, error } => {
                tracing::warn!(item = %c.item.name, %error, retry_in = ?wait, "not published; will retry");
                self.metrics.retried(class);
            }
            Outcome::Failed(error) => {
                tracing::error!(item = %c.item.name, %error, "not published; giving up")
            }
            _ => {}
        }
        outcome
    }

    async fn store(&self) -> Result<Arc<Store>, Failure> {
        let address = self.settings.store.clone();
        self.store
            .get(|| async move {
                let address = StoreAddress::resolve(address.as_deref())
                    .map_err(|e| Failure::transient(e.to_string()))?;
                let store = tokio::task::spawn_blocking(move || Store::open(address))
                    .await
                    .map_err(|e| Failure::transient(e.to_string()))?
                    .map_err(|e| Failure {
                        class: "store",
                        ..Failure::transient(format!(
                            "cannot open the Nix store: {}",
                            error_chain(&e)
                        ))
                    })?;
                Ok(Arc::new(store))
            })
            .await
    }

    async fn publisher(&self, store: &Arc<Store>) -> Result<nixpush_cache::Publisher, Failure> {
        let settings = &self.settings;
        let metrics = self.metrics.clone();
        let source: Arc<dyn NarSource> = Arc::new(StoreSource(store.clone()));
        self.publisher
            .get(|| async move {
                let journal = settings.state_dir.join("multipart");
                let observer: nixpush_cache::RequestObserver =
                    Arc::new(move |operation, outcome| metrics.s3_request(operation, outcome));
                let cache =
                    Cache::open_observed(settings.url.clone(), Some(&journal), Some(observer))
                        .await
                        .map_err(|e| {
                            let f = failure_of(&e);
                            tracing::warn!(error = %f.message, "cannot open the cache; will retry");
                            // Keeps the server's Retry-After when opening was throttled.
                            f
                        })?;
                match cache.abort_stale_uploads().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        aborted = n,
                        "aborted multipart uploads left by an earlier run"
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot abort earlier multipart uploads"),
                }
                let opts = PushOptions {
                    jobs: settings.jobs,
                    keys: settings.keys.clone(),
                    skip_signed_by: settings.skip_signed_by.clone(),
                    spool_dir: settings.state_dir.join("spool"),
                };
                Ok(cache.publisher(source, &opts))
            })
            .await
    }
}

fn resolve(store: &Store, name: &str, kind: Kind) -> Result<Vec<StorePath>, StoreError> {
    let path: StorePath = name
        .parse()
        .map_err(|e| StoreError::Protocol(format!("queued item {name:?}: {e}")))?;
    match kind {
        Kind::Path => store.path_info(&path).map(|_| vec![path]),
        Kind::Derivation => {
            // Outputs collected since the build (one of several, say) are reported; the others
            // are still worth publishing.
            let (built, missing) = store.built_outputs(&path)?;
            if !missing.is_empty() {
                tracing::warn!(drv = %path, missing = %missing.join(", "), "outputs gone from the store; publishing the others");
            }
            Ok(built)
        }
    }
}

fn log_event(item: &str, e: Event) {
    match e {
        Event::Uploaded {
            path,
            nar_size,
            file_size,
            ..
        } => {
            tracing::info!(%path, nar_size, file_size, "uploaded")
        }
        Event::Failed { path, error } => tracing::warn!(%item, %path, %error, "not published"),
        Event::Planned {
            upload,
            present,
            skipped,
            nar_bytes,
        } if upload > 0 => {
            tracing::info!(%item, upload, present, skipped, nar_bytes, "pushing")
        }
        Event::Planned { .. } | Event::AlreadyPresent { .. } | Event::Skipped { .. } => {}
    }
}
