//! The worker: claims due items, resolves derivations to outputs, pushes the closures, and records
//! each item's outcome (see [`crate::decide`]); meanwhile it imports spilled hook records and keeps
//! the GC roots of queued items in step with the queue.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use nixpush_cache::{Cache, CacheError, Event, NarSource, PushOptions, error_chain};
use nixpush_format::StorePath;
use nixpush_queue::{Claimed, Kind, Outcome, Queue};
use nixpush_store::{GcRoots, Store, StoreAddress, StoreError};
use tokio::sync::{Notify, watch};

use crate::Settings;
use crate::decide::{self, Failure, StoreVerdict, failure_of, store_verdict};
use crate::intake::gather;
use crate::metrics::Metrics;
use crate::source::StoreSource;

/// Items claimed at once: one closure computation and one push for all of them.
const BATCH: usize = 1000;
/// Recording a batch's outcomes that failed is tried again after this, doubling up to the maximum.
const RECORD_RETRY_MIN: Duration = Duration::from_secs(1);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(60);
/// The metrics file is rewritten this often, and after every batch.
const METRICS_EVERY: Duration = Duration::from_secs(15);
/// GC roots are made to match the queue at start and this often (see [`Worker::sweep_roots`]).
const ROOTS_SWEEP: Duration = Duration::from_secs(300);
/// Roots younger than this are never swept away: the hook makes them just before it records the
/// item, so the queue may not show it yet.
const ROOTS_GRACE: Duration = Duration::from_secs(60);
/// Hooks that cannot reach the daemon write the queue directly; look for such work this often.
const POLL: Duration = Duration::from_secs(1);

pub(crate) struct Worker {
    pub(crate) settings: Settings,
    queue: Arc<Mutex<Queue>>,
    /// Opened on first use, and again after a connection broke.
    store: Option<Arc<Store>>,
    cache: Option<Arc<Cache>>,
    metrics: Arc<Metrics>,
}

impl Worker {
    pub(crate) fn new(settings: Settings, queue: Arc<Mutex<Queue>>, metrics: Arc<Metrics>) -> Self {
        Worker {
            settings,
            queue,
            store: None,
            cache: None,
            metrics,
        }
    }

    /// Refreshes the queue's figures and writes the metrics file, if one is configured.
    async fn report(&self) {
        // Nobody reads them: spare the queue the queries (a batch ends every 100 ms in a burst).
        if self.settings.metrics_textfile.is_none() && self.settings.metrics_listen.is_none() {
            return;
        }
        let now = nixpush_queue::now_ms();
        if let Ok(status) = self.with_queue(|q| q.status(0)).await {
            self.metrics.set_queue(&status, now);
        }
        if let Ok(fallbacks) = self.with_queue(|q| q.fallbacks()).await {
            self.metrics.set_fallbacks(&fallbacks);
        }
        if let Some(path) = &self.settings.metrics_textfile
            && let Err(e) = self.metrics.write_file(path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the metrics file");
        }
    }

    async fn with_queue<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Queue) -> Result<T, nixpush_queue::QueueError> + Send + 'static,
    ) -> Result<T> {
        let q = self.queue.clone();
        Ok(
            tokio::task::spawn_blocking(move || {
                f(&mut q.lock().unwrap_or_else(|e| e.into_inner()))
            })
            .await??,
        )
    }

    pub(crate) async fn run(&mut self, work: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let mut swept = None::<Instant>;
        let mut reported = None::<Instant>;
        let mut imported = None::<Instant>;
        let mut spill_error = None::<String>;
        loop {
            if *stop.borrow() {
                break;
            }
            if imported.is_none_or(|t| t.elapsed() >= POLL) {
                self.import_spill(&mut spill_error).await;
                imported = Some(Instant::now());
            }
            if swept.is_none_or(|t| t.elapsed() >= ROOTS_SWEEP) {
                self.sweep_roots().await;
                swept = Some(Instant::now());
            }
            if reported.is_none_or(|t| t.elapsed() >= METRICS_EVERY) {
                self.report().await;
                reported = Some(Instant::now());
            }
            let claimed = match self
                .with_queue(|q| q.claim(nixpush_queue::now_ms(), BATCH))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot read the queue");
                    Vec::new()
                }
            };
            if claimed.is_empty() {
                let now = nixpush_queue::now_ms();
                let next = self
                    .with_queue(move |q| q.next_due(now))
                    .await
                    .ok()
                    .flatten();
                let wait = next.map_or(POLL, |t| {
                    Duration::from_millis((t - now).max(0) as u64).min(POLL)
                });
                tokio::select! {
                    _ = work.notified() => gather(&work, &mut stop).await,
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let outcomes = self.attempt(&claimed).await;
            self.record(claimed, outcomes, &mut stop).await;
        }
    }

    /// Records a batch's outcomes, trying again until it succeeds (a full disk, a queue locked by
    /// another process): the work is done, and losing its record would leave the items in flight
    /// until the next restart. When the daemon is told to stop meanwhile, the items are left in
    /// flight, and the next start queues them again.
    async fn record(
        &self,
        claimed: Vec<Claimed>,
        outcomes: Vec<Outcome>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let batch = Arc::new((claimed, outcomes));
        let mut wait = RECORD_RETRY_MIN;
        loop {
            let b = batch.clone();
            let recorded = self
                .with_queue(move |q| {
                    let done: Vec<_> = b.0.iter().zip(&b.1).collect();
                    q.complete_all(&done)
                })
                .await;
            let Err(e) = recorded else {
                let now = nixpush_queue::now_ms();
                for (c, o) in batch.0.iter().zip(&batch.1) {
                    if *o == Outcome::Done {
                        let lag = Duration::from_millis((now - c.enqueued_at).max(0) as u64);
                        self.metrics.published(lag, now);
                    }
                }
                self.release(&batch.0, &batch.1).await;
                self.report().await;
                return;
            };
            if *stop.borrow() {
                tracing::error!(
                    error = %format!("{e:#}"),
                    items = batch.0.len(),
                    "cannot record results; the items stay in flight and are queued again at the next start"
                );
                return;
            }
            tracing::error!(
                error = %format!("{e:#}"),
                items = batch.0.len(),
                retry_in = ?wait,
                "cannot record results; trying again"
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
            wait = (wait * 2).min(RECORD_RETRY_MAX);
        }
    }

    /// Queues what hooks recorded in the spill directory when the queue could not take it; says so
    /// once per distinct error while it still cannot.
    async fn import_spill(&self, last_error: &mut Option<String>) {
        let dir = self.settings.spill_dir.clone();
        let q = self.queue.clone();
        let imported = tokio::task::spawn_blocking(move || {
            // What the socket accepts, and no more: a spill file is an input too.
            let accept = |i: &nixpush_queue::Item| {
                i.name
                    .parse::<StorePath>()
                    .is_ok_and(|p| i.kind == Kind::Path || p.is_derivation())
            };
            nixpush_queue::spill::import(
                &dir,
                &mut q.lock().unwrap_or_else(|e| e.into_inner()),
                accept,
            )
        })
        .await;
        match imported {
            Ok(Ok(imported)) => {
                if imported.added > 0 {
                    tracing::info!(items = imported.added, dir = %self.settings.spill_dir.display(), "queued items the hook had to spill");
                }
                for (file, why) in imported.set_aside {
                    tracing::error!(file = %file.display(), why, "set aside a spill file that cannot be imported");
                }
                *last_error = None;
            }
            Ok(Err(e)) => {
                let e = format!("{:#}", anyhow::Error::from(e));
                if last_error.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "cannot queue spilled items yet; they stay in the spill directory");
                    *last_error = Some(e);
                }
            }
            Err(e) => tracing::error!(error = %e, "importing spilled items panicked"),
        }
    }

    /// Lets the collector have the paths of items that reached a final outcome.
    async fn release(&self, claimed: &[Claimed], outcomes: &[Outcome]) {
        let Some(roots) = &self.settings.roots else {
            return;
        };
        let finished: Vec<String> = claimed
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| !matches!(o, Outcome::RetryIn { .. }))
            .map(|(c, _)| c.item.name.clone())
            .collect();
        // An item queued again since (a rebuild whose hook came while it was in flight) keeps the
        // roots its hook just made.
        let pending: HashSet<String> = match self.with_queue(|q| q.pending()).await {
            Ok(p) => p.into_iter().map(|i| i.name).collect(),
            Err(_) => return,
        };
        let dir = roots.dir().to_owned();
        let released = tokio::task::spawn_blocking(move || {
            let roots = GcRoots::new(dir);
            finished
                .iter()
                .filter(|item| !pending.contains(*item))
                .try_for_each(|item| roots.release(item))
        })
        .await;
        if let Ok(Err(e)) = released {
            tracing::warn!(error = %e, "cannot remove GC roots of finished items; the next sweep will");
        }
    }

    /// Makes the roots match the queue: each pending item among the oldest `gc-roots-max` has its
    /// roots (the hook may have failed to make them, or a crash lost them), and nothing else has
    /// any (finished items whose roots were not removed, items beyond the cap).
    async fn sweep_roots(&self) {
        let Some(roots) = &self.settings.roots else {
            return;
        };
        let pending = match self.with_queue(|q| q.pending()).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the queue to sweep GC roots");
                return;
            }
        };
        let (dir, max) = (roots.dir().to_owned(), self.settings.roots_max);
        // Items waiting in the spill directory are not in the queue yet: while there are any, roots
        // are only added, never removed.
        let spill = self.settings.spill_dir.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let release = nixpush_queue::spill::pending(&spill).is_ok_and(|f| f.is_empty());
            sweep(&GcRoots::new(dir), &pending, max, release)
        })
        .await;
        match swept {
            Ok(Ok((added, removed, beyond))) => {
                if added + removed > 0 {
                    tracing::info!(added, removed, "GC roots swept");
                }
                if beyond > 0 {
                    tracing::warn!(
                        unprotected = beyond,
                        max,
                        "more queued items than gc-roots-max; the newest are not protected from garbage collection"
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot sweep GC roots"),
            Err(e) => tracing::warn!(error = %e, "GC root sweep panicked"),
        }
    }

    async fn store(&mut self) -> Result<Arc<Store>, String> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let address =
            StoreAddress::resolve(self.settings.store.as_deref()).map_err(|e| e.to_string())?;
        let store = tokio::task::spawn_blocking(move || Store::open(address))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot open the Nix store: {}", error_chain(&e)))?;
        let store = Arc::new(store);
        self.store = Some(store.clone());
        Ok(store)
    }

    async fn cache(&mut self) -> Result<Arc<Cache>, CacheError> {
        if let Some(c) = &self.cache {
            return Ok(c.clone());
        }
        let journal = self.settings.state_dir.join("multipart");
        let metrics = self.metrics.clone();
        let observer: nixpush_cache::RequestObserver =
            Arc::new(move |operation, outcome| metrics.s3_request(operation, outcome));
        let cache = Arc::new(
            Cache::open_observed(self.settings.url.clone(), Some(&journal), Some(observer)).await?,
        );
        match cache.abort_stale_uploads().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                aborted = n,
                "aborted multipart uploads left by an earlier run"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot abort earlier multipart uploads"),
        }
        self.cache = Some(cache.clone());
        Ok(cache)
    }

    /// One attempt at a batch; returns an outcome for every claimed item, in order.
    async fn attempt(&mut self, claimed: &[Claimed]) -> Vec<Outcome> {
        let started = Instant::now();
        let store = match self.store().await {
            Ok(s) => s,
            Err(e) => return self.all_retry(claimed, Failure::transient(e)),
        };
        // Resolve each item to the paths it stands for; gone ones end here.
        let items: Vec<(String, Kind)> = claimed
            .iter()
            .map(|c| (c.item.name.clone(), c.item.kind))
            .collect();
        let resolve_store = store.clone();
        let resolved = tokio::task::spawn_blocking(move || {
            items
                .iter()
                .map(|(name, kind)| resolve(&resolve_store, name, *kind))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if resolved.len() != claimed.len() {
            return self.all_retry(claimed, Failure::transient("resolving paths failed".into()));
        }
        if resolved.iter().any(|r| {
            r.as_ref()
                .is_err_and(|e| store_verdict(e) == StoreVerdict::Reconnect)
        }) {
            // The connection to nix-daemon broke: open a new one next time.
            self.store = None;
        }
        let mut roots: Vec<StorePath> = Vec::new();
        for r in resolved.iter().flatten() {
            roots.extend(r.iter().cloned());
        }
        roots.sort();
        roots.dedup();
        let closure = if roots.is_empty() {
            Ok(Default::default())
        } else {
            let (store, roots, jobs) = (store.clone(), roots.clone(), self.settings.jobs);
            tokio::task::spawn_blocking(move || store.closure(&roots, jobs))
                .await
                .unwrap_or_else(|e| Err(StoreError::Protocol(e.to_string())))
        };
        let closure = match closure {
            Ok(c) => c,
            Err(e) => {
                self.store = None;
                return self.finish(
                    claimed,
                    &resolved,
                    &HashSet::new(),
                    &HashMap::new(),
                    Some(Failure::transient(error_chain(&e))),
                );
            }
        };
        let (ok, failed) = if closure.is_empty() {
            (HashSet::new(), HashMap::new())
        } else {
            let cache = match self.cache().await {
                Ok(c) => c,
                Err(e) => {
                    let f = failure_of(&e);
                    tracing::warn!(error = %f.message, "cannot open the cache; will retry");
                    // Keeps the server's Retry-After when opening was throttled.
                    return self.finish(
                        claimed,
                        &resolved,
                        &HashSet::new(),
                        &HashMap::new(),
                        Some(f),
                    );
                }
            };
            let opts = PushOptions {
                jobs: self.settings.jobs,
                keys: self.settings.keys.clone(),
                skip_signed_by: self.settings.skip_signed_by.clone(),
                spool_dir: self.settings.state_dir.join("spool"),
            };
            let source: Arc<dyn NarSource> = Arc::new(StoreSource(store));
            let summary = cache
                .push(closure.into_values().collect(), source, &opts, &log_event)
                .await;
            self.metrics.uploaded(summary.file_bytes);
            let ok: HashSet<StorePath> = summary
                .uploaded
                .iter()
                .chain(&summary.present)
                .chain(&summary.skipped)
                .cloned()
                .collect();
            let failed: HashMap<StorePath, CacheError> = summary.failed.into_iter().collect();
            (ok, failed)
        };
        tracing::debug!(items = claimed.len(), elapsed = ?started.elapsed(), "batch done");
        self.finish(claimed, &resolved, &ok, &failed, None)
    }

    fn finish(
        &self,
        claimed: &[Claimed],
        resolved: &[Result<Vec<StorePath>, StoreError>],
        ok: &HashSet<StorePath>,
        failed: &HashMap<StorePath, CacheError>,
        batch_error: Option<Failure>,
    ) -> Vec<Outcome> {
        claimed
            .iter()
            .zip(resolved)
            .map(|(c, resolved)| {
                let attempt = decide::Attempt {
                    resolved,
                    ok,
                    failed,
                    batch_error: batch_error.as_ref(),
                };
                let outcome = decide::outcome(c, &attempt, |c, f| self.retry(c, f));
                if matches!(outcome, Outcome::Gone(_)) {
                    tracing::info!(item = %c.item.name, "gone from the store; nothing to upload");
                }
                outcome
            })
            .collect()
    }

    fn all_retry(&self, claimed: &[Claimed], f: Failure) -> Vec<Outcome> {
        tracing::warn!(error = %f.message, "batch failed; will retry");
        claimed.iter().map(|c| self.retry(c, f.clone())).collect()
    }

    fn retry(&self, c: &Claimed, f: Failure) -> Outcome {
        // Full jitter needs a uniform number in [0, 1): the top 53 bits of a random u64.
        let unit = getrandom::u64().map_or(0.5, |r| (r >> 11) as f64 / (1u64 << 53) as f64);
        let class = f.class;
        let outcome = decide::retry(&self.settings.retry, c, f, unit);
        if matches!(outcome, Outcome::RetryIn { .. }) {
            self.metrics.retried(class);
        }
        outcome
    }
}

/// See [`Worker::sweep_roots`]. Returns (items rooted, items released, pending items left
/// unprotected by the cap).
fn sweep(
    roots: &GcRoots,
    pending: &[nixpush_queue::Item],
    max: usize,
    release: bool,
) -> std::io::Result<(usize, usize, usize)> {
    let keep: HashSet<&str> = pending.iter().take(max).map(|i| i.name.as_str()).collect();
    let rooted: HashSet<String> = roots.items()?.into_iter().collect();
    let mut removed = 0;
    for item in rooted
        .iter()
        .filter(|r| release && !keep.contains(r.as_str()))
    {
        if roots.age(item).is_some_and(|age| age < ROOTS_GRACE) {
            continue;
        }
        roots.release(item)?;
        removed += 1;
    }
    let mut added = 0;
    for name in keep.iter().filter(|k| !rooted.contains(**k)) {
        let Ok(item) = name.parse::<StorePath>() else {
            continue;
        };
        // A derivation that is gone cannot be read; its item will end `gone` anyway.
        if let Ok(paths) = GcRoots::paths_of(&item) {
            roots.protect(&item, &paths)?;
            added += 1;
        }
    }
    Ok((added, removed, pending.len().saturating_sub(max)))
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

fn log_event(e: Event) {
    match e {
        Event::Uploaded {
            path,
            nar_size,
            file_size,
            ..
        } => {
            tracing::info!(%path, nar_size, file_size, "uploaded")
        }
        Event::Failed { path, error } => tracing::warn!(%path, %error, "not published"),
        Event::Planned {
            upload,
            present,
            skipped,
            nar_bytes,
        } => {
            tracing::info!(upload, present, skipped, nar_bytes, "pushing")
        }
        Event::AlreadyPresent { .. } | Event::Skipped { .. } => {}
    }
}
