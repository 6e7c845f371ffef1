//! The worker: claims due items as they come (gathering the builds that finish together, see
//! [`Gathering`]) and runs an attempt for each (see [`crate::item`]), at most [`IN_FLIGHT`] at
//! once; records each outcome as soon as it is known; meanwhile imports spilled hook records and
//! keeps the GC roots of queued items in step with the queue. On stop it lets the attempts in hand
//! finish for `stop-timeout`, then puts the rest back in the queue.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use nixpush_format::StorePath;
use nixpush_queue::{Claimed, Outcome, Queue};
use nixpush_store::GcRoots;
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::Settings;
use crate::decide::Failure;
use crate::item::Attempts;
use crate::metrics::Metrics;
use crate::systemd;

/// Items whose attempts run at once. Each holds its closure's path infos while it runs; a backlog
/// larger than this waits in the queue, in order.
const IN_FLIGHT: usize = 1000;
/// Outcomes are committed together when they come faster than this: one durable write each would
/// compete with the hooks' enqueues for the queue.
const RECORD_EVERY: Duration = Duration::from_millis(50);
/// Recording outcomes that failed is tried again after this, doubling up to the maximum.
const RECORD_RETRY_MIN: Duration = Duration::from_secs(1);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(60);
/// The metrics file is rewritten this often, and at most once a second after outcomes.
const METRICS_EVERY: Duration = Duration::from_secs(15);
const METRICS_AFTER_OUTCOMES: Duration = Duration::from_secs(1);
/// GC roots are made to match the queue at start and this often (see [`Worker::sweep_roots`]).
const ROOTS_SWEEP: Duration = Duration::from_secs(300);
/// Roots younger than this are never swept away: the hook makes them just before it records the
/// item, so the queue may not show it yet.
const ROOTS_GRACE: Duration = Duration::from_secs(60);
/// Finished rows older than `keep-finished` are pruned at start and this often (or as often as the
/// retention, if shorter).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Hooks that cannot reach the daemon write the queue directly; look for such work this often.
const POLL: Duration = Duration::from_secs(1);

/// What wakes the worker.
#[derive(Default)]
pub(crate) struct Wake {
    /// A hook recorded builds: they are claimed once the gathering window is over.
    pub(crate) arrived: Notify,
    /// Someone waits for the queue (`nixpush wait`): claim now.
    pub(crate) wanted: Notify,
}

/// When the claim for the builds that hooks recorded is due: `gather` after the first arrival since
/// the last claim. Builds that finish within it are claimed in one transaction and pushed at once,
/// so they share their session write and their looks at the collector's state, which one build at
/// a time would each pay for (7 S3 requests a build on its own, 5.1 gathered, measured over 100
/// builds in a row). The window never extends: a steady stream of builds is claimed every
/// `gather`, not held back.
pub(crate) struct Gathering {
    window: Duration,
    due: Option<Instant>,
}

impl Gathering {
    pub(crate) fn new(window: Duration) -> Self {
        Gathering { window, due: None }
    }

    pub(crate) fn arrived(&mut self, now: Instant) {
        let at = now + self.window;
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }

    pub(crate) fn wanted(&mut self, now: Instant) {
        self.due = Some(now);
    }

    /// Whether the window that arrivals opened is over; that ends it. Claims wait while it runs.
    pub(crate) fn end_if_over(&mut self, now: Instant) -> bool {
        match self.due {
            Some(due) if due <= now => {
                self.due = None;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn running(&self) -> bool {
        self.due.is_some()
    }

    /// How long until the window is over, if one runs.
    pub(crate) fn left(&self, now: Instant) -> Option<Duration> {
        self.due.map(|due| due.saturating_duration_since(now))
    }
}

pub(crate) struct Worker {
    pub(crate) settings: Arc<Settings>,
    queue: Arc<Mutex<Queue>>,
    queue_on: Handle,
    attempts: Arc<Attempts>,
    metrics: Arc<Metrics>,
}

/// The outcomes not yet recorded, and when to try recording them.
struct Unrecorded {
    outcomes: Vec<(Claimed, Outcome)>,
    /// Not before this: the last record was just now, or failed.
    not_before: Option<Instant>,
    /// The wait after a failed record, doubling.
    backoff: Duration,
}

impl Worker {
    /// `queue_on`: the runtime whose blocking threads work on the queue (see [`Worker::with_queue`]).
    pub(crate) fn new(
        settings: Settings,
        queue: Arc<Mutex<Queue>>,
        queue_on: Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        let settings = Arc::new(settings);
        Worker {
            attempts: Arc::new(Attempts::new(settings.clone(), metrics.clone())),
            settings,
            queue,
            queue_on,
            metrics,
        }
    }

    /// Refreshes the queue's figures and writes the metrics file, if one is configured.
    async fn report(&self) {
        // Nobody reads them: spare the queue the queries.
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

    /// Runs `f` on the queue, on a blocking thread of the intake's runtime: the hooks' commits wait
    /// for the queue's lock, so what holds it keeps the intake's priority, not the uploads' (a
    /// transaction at nice 10, preempted by builds, held the hooks and their builds back).
    async fn with_queue<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Queue) -> Result<T, nixpush_queue::QueueError> + Send + 'static,
    ) -> Result<T> {
        let q = self.queue.clone();
        Ok(blocking_on(&self.queue_on, move || {
            f(&mut q.lock().unwrap_or_else(|e| e.into_inner()))
        })
        .await??)
    }

    pub(crate) async fn run(&mut self, wake: Arc<Wake>, mut stop: watch::Receiver<bool>) {
        let mut running: JoinSet<(Claimed, Outcome)> = JoinSet::new();
        // What is running, by task: put back in the queue if the daemon stops first.
        let mut in_hand: HashMap<tokio::task::Id, Claimed> = HashMap::new();
        let mut unrecorded = Unrecorded {
            outcomes: Vec::new(),
            not_before: None,
            backoff: RECORD_RETRY_MIN,
        };
        let mut swept = None::<Instant>;
        let mut pruned = None::<Instant>;
        let mut reported = None::<Instant>;
        let mut imported = None::<Instant>;
        let mut spill_error = None::<String>;
        let mut watchdog = systemd::Watchdog::new();
        // Whether a claim may find work: not after one that came back short, until the window a
        // hook's request opened ends, a `wait` asks, the next due item's time comes, or a retry
        // scheduled since says so. An attempt that ends only frees room; claiming for it again
        // would take the queue's write lock from the hooks once per finished item.
        let mut may_find = true;
        let mut gathering = Gathering::new(self.settings.gather);
        while !*stop.borrow() {
            watchdog.alive();
            if imported.is_none_or(|t| t.elapsed() >= POLL) {
                if self.import_spill(&mut spill_error).await > 0 {
                    may_find = true;
                }
                imported = Some(Instant::now());
            }
            if swept.is_none_or(|t| t.elapsed() >= ROOTS_SWEEP) {
                self.sweep_roots().await;
                swept = Some(Instant::now());
            }
            let prune_every = PRUNE_EVERY.min(self.settings.keep_finished).max(POLL);
            if pruned.is_none_or(|t| t.elapsed() >= prune_every) {
                self.prune(&mut watchdog, &stop).await;
                pruned = Some(Instant::now());
            }
            let mut wait = POLL.min(watchdog.within().unwrap_or(POLL));
            may_find |= gathering.end_if_over(Instant::now());
            if let Some(left) = gathering.left(Instant::now()) {
                wait = wait.min(left);
            }
            let room = IN_FLIGHT - running.len();
            // While a window runs, even the poll's and the retries' claims wait for it: one claim
            // then takes them all.
            if room > 0 && may_find && !gathering.running() {
                let claimed = match self
                    .with_queue(move |q| q.claim(nixpush_queue::now_ms(), room))
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "cannot read the queue");
                        Vec::new()
                    }
                };
                if claimed.len() < room {
                    may_find = false;
                    let now = nixpush_queue::now_ms();
                    if let Ok(Some(t)) = self.with_queue(move |q| q.next_due(now)).await {
                        wait = wait.min(Duration::from_millis((t - now).max(0) as u64));
                    }
                }
                for c in claimed {
                    let task = running.spawn(self.attempts.clone().attempt(c.clone()));
                    in_hand.insert(task.id(), c);
                }
            }
            if !unrecorded.outcomes.is_empty() {
                match unrecorded.not_before {
                    Some(t) if t > Instant::now() => wait = wait.min(t - Instant::now()),
                    _ => {
                        // A retry is due later than the next due item seen at the last claim.
                        may_find |= unrecorded
                            .outcomes
                            .iter()
                            .any(|(_, o)| matches!(o, Outcome::RetryIn { .. }));
                        self.record(&mut unrecorded, false).await;
                        if unrecorded.outcomes.is_empty()
                            && reported.is_none_or(|t| t.elapsed() >= METRICS_AFTER_OUTCOMES)
                        {
                            self.report().await;
                            reported = Some(Instant::now());
                        }
                    }
                }
            }
            if reported.is_none_or(|t| t.elapsed() >= METRICS_EVERY) {
                self.report().await;
                reported = Some(Instant::now());
            }
            tokio::select! {
                Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                    let mut next = Some(joined);
                    // Everything that ended meanwhile, recorded together.
                    while let Some(joined) = next {
                        self.finished(joined, &mut in_hand, &mut unrecorded);
                        next = running.try_join_next_with_id();
                    }
                }
                _ = wake.arrived.notified() => gathering.arrived(Instant::now()),
                _ = wake.wanted.notified() => gathering.wanted(Instant::now()),
                _ = tokio::time::sleep(wait) => may_find = true,
                _ = stop.changed() => {}
            }
        }
        self.drain(running, in_hand, unrecorded).await;
    }

    /// Takes an attempt that ended out of hand, its outcome to be recorded. One that panicked (a
    /// bug) is retried like any failure; one cancelled (the daemon stopped) stays in hand, to be
    /// put back in the queue.
    fn finished(
        &self,
        joined: Result<(tokio::task::Id, (Claimed, Outcome)), tokio::task::JoinError>,
        in_hand: &mut HashMap<tokio::task::Id, Claimed>,
        unrecorded: &mut Unrecorded,
    ) {
        match joined {
            Ok((task, (c, outcome))) => {
                in_hand.remove(&task);
                unrecorded.outcomes.push((c, outcome));
            }
            Err(e) if e.is_panic() => {
                if let Some(c) = in_hand.remove(&e.id()) {
                    let f = Failure::transient(format!("the upload attempt panicked: {e}"));
                    let outcome = self.attempts.retry(&c, f);
                    unrecorded.outcomes.push((c, outcome));
                }
            }
            Err(_) => {}
        }
    }

    /// Lets the attempts in hand finish for `stop-timeout`, records what ended, and puts the rest
    /// back in the queue as they were.
    async fn drain(
        &self,
        mut running: JoinSet<(Claimed, Outcome)>,
        mut in_hand: HashMap<tokio::task::Id, Claimed>,
        mut unrecorded: Unrecorded,
    ) {
        if !running.is_empty() {
            tracing::info!(
                items = running.len(),
                timeout = ?self.settings.stop_timeout,
                "stopping: waiting for the uploads in hand"
            );
        }
        let deadline = tokio::time::Instant::now() + self.settings.stop_timeout;
        loop {
            tokio::select! {
                joined = running.join_next_with_id() => match joined {
                    Some(joined) => self.finished(joined, &mut in_hand, &mut unrecorded),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        running.abort_all();
        while let Some(joined) = running.join_next_with_id().await {
            self.finished(joined, &mut in_hand, &mut unrecorded);
        }
        self.record(&mut unrecorded, true).await;
        if !in_hand.is_empty() {
            let ids: Vec<i64> = in_hand.values().map(|c| c.id).collect();
            match self.with_queue(move |q| q.requeue(&ids)).await {
                Ok(n) => tracing::info!(
                    items = n,
                    "stopped before these were published; they stay queued"
                ),
                Err(e) => tracing::error!(
                    error = %format!("{e:#}"),
                    items = in_hand.len(),
                    "cannot put unfinished items back in the queue; the next start will"
                ),
            }
        }
        self.report().await;
    }

    /// Records the outcomes in one transaction. When that fails (a full disk, a queue locked by
    /// another process) they are kept and tried again after a backoff: the work is done, and losing
    /// its record would leave the items in flight until the next restart. `last`: the daemon is
    /// stopping; the items stay in flight, and the next start queues them again.
    async fn record(&self, unrecorded: &mut Unrecorded, last: bool) {
        if unrecorded.outcomes.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut unrecorded.outcomes);
        let recorded = self
            .with_queue(move |q| {
                let done: Vec<_> = batch.iter().map(|(c, o)| (c, o)).collect();
                let recorded = q.complete_all(&done);
                Ok((batch, recorded))
            })
            .await;
        // Only a panic in the queue's code loses the batch; its items are queued again at the next
        // start.
        let Ok((batch, recorded)) = recorded else {
            tracing::error!("recording results panicked");
            return;
        };
        if let Err(e) = recorded {
            let items = batch.len();
            if last {
                tracing::error!(
                    error = %e,
                    items,
                    "cannot record results; the items stay in flight and are queued again at the next start"
                );
                return;
            }
            tracing::error!(
                error = %e,
                items,
                retry_in = ?unrecorded.backoff,
                "cannot record results; trying again"
            );
            unrecorded.outcomes = batch;
            unrecorded.not_before = Some(Instant::now() + unrecorded.backoff);
            unrecorded.backoff = (unrecorded.backoff * 2).min(RECORD_RETRY_MAX);
            return;
        }
        unrecorded.not_before = Some(Instant::now() + RECORD_EVERY);
        unrecorded.backoff = RECORD_RETRY_MIN;
        let now = nixpush_queue::now_ms();
        for (c, o) in &batch {
            if *o == Outcome::Done {
                let lag = Duration::from_millis((now - c.enqueued_at).max(0) as u64);
                self.metrics.published(lag, now);
            }
        }
        self.release(&batch).await;
    }

    async fn import_spill(&self, last_error: &mut Option<String>) -> usize {
        import_spill(
            &self.queue_on,
            self.settings.spill_dir.clone(),
            self.queue.clone(),
            last_error,
        )
        .await
    }

    /// Forgets finished items older than `keep-finished`, so the queue does not grow forever. A
    /// transaction at a time, so hook requests get the queue in between, and the watchdog hears
    /// from the loop meanwhile (the first prune after an upgrade may face years of history).
    async fn prune(&self, watchdog: &mut systemd::Watchdog, stop: &watch::Receiver<bool>) {
        const AT_ONCE: usize = 10_000;
        let keep = i64::try_from(self.settings.keep_finished.as_millis()).unwrap_or(i64::MAX);
        let before = nixpush_queue::now_ms().saturating_sub(keep);
        let mut rows = 0;
        // Stopping ends it between transactions; the next start carries on.
        while !*stop.borrow() {
            watchdog.alive();
            match self.with_queue(move |q| q.prune(before, AT_ONCE)).await {
                Ok(n) => {
                    rows += n;
                    if n < AT_ONCE {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot prune the queue");
                    break;
                }
            }
        }
        if rows > 0 {
            tracing::info!(rows, "pruned finished items from the queue");
        }
    }

    /// Lets the collector have the paths of items that reached a final outcome.
    async fn release(&self, recorded: &[(Claimed, Outcome)]) {
        let Some(roots) = &self.settings.roots else {
            return;
        };
        let finished: Vec<(String, i64)> = recorded
            .iter()
            .filter(|(_, o)| !matches!(o, Outcome::RetryIn { .. }))
            .map(|(c, _)| (c.item.name.clone(), c.enqueued_at))
            .collect();
        if finished.is_empty() {
            return;
        }
        // An item queued again since (a rebuild whose hook came after its outcome) keeps the roots
        // its hook just made.
        let names: Vec<String> = finished.iter().map(|(n, _)| n.clone()).collect();
        let pending: HashSet<String> = match self.with_queue(move |q| q.pending_among(&names)).await
        {
            Ok(p) => p.into_iter().collect(),
            Err(_) => return,
        };
        let dir = roots.dir().to_owned();
        let released = tokio::task::spawn_blocking(move || {
            let roots = GcRoots::new(dir);
            finished
                .iter()
                .filter(|(item, _)| !pending.contains(item))
                // Nor roots made after the item was queued: a hook for it that came after the
                // look-up above made them, and is queueing it again. (2 ms for the roundings of
                // two millisecond clocks; the hook makes its roots before the item is queued.)
                // The roots' time is compared with the queue's, not aged by a second reading of
                // the clock: a pause between the two readings would keep them until the sweep.
                .filter(|(item, enqueued_at)| {
                    roots
                        .made(item)
                        .is_none_or(|made| nixpush_queue::ms_of(made) <= *enqueued_at + 2)
                })
                .try_for_each(|(item, _)| roots.release(item))
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

/// Runs `f` on a blocking thread of `on`'s runtime, asked for from that runtime's own thread: a
/// thread inherits the priority of the one that starts it, and these must have the intake's.
async fn blocking_on<T: Send + 'static>(
    on: &Handle,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    on.spawn(async move { tokio::task::spawn_blocking(f).await })
        .await?
}

/// Queues what hooks recorded in the spill directory when the queue could not take it; says so
/// once per distinct error while it still cannot. Returns how many items it queued.
pub(crate) async fn import_spill(
    queue_on: &Handle,
    dir: std::path::PathBuf,
    q: Arc<Mutex<Queue>>,
    last_error: &mut Option<String>,
) -> usize {
    let shown = dir.clone();
    let imported = blocking_on(queue_on, move || {
        nixpush_queue::spill::import(
            &dir,
            &mut q.lock().unwrap_or_else(|e| e.into_inner()),
            crate::intake::accepts,
        )
    })
    .await;
    match imported {
        Ok(Ok(imported)) => {
            if imported.added > 0 {
                tracing::info!(items = imported.added, dir = %shown.display(), "queued items the hook had to spill");
            }
            for (file, why) in imported.set_aside {
                tracing::error!(file = %file.display(), why, "set aside a spill file that cannot be imported");
            }
            *last_error = None;
            imported.added
        }
        Ok(Err(e)) => {
            let e = format!("{:#}", anyhow::Error::from(e));
            if last_error.as_ref() != Some(&e) {
                tracing::error!(error = %e, "cannot queue spilled items yet; they stay in the spill directory");
                *last_error = Some(e);
            }
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "importing spilled items panicked");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn builds_arriving_within_the_window_are_claimed_at_its_end() {
        let t0 = Instant::now();
        let mut g = Gathering::new(100 * MS);
        assert!(!g.running() && !g.end_if_over(t0), "nothing arrived");
        g.arrived(t0);
        // Later arrivals join the window; they do not extend it.
        g.arrived(t0 + 60 * MS);
        g.arrived(t0 + 99 * MS);
        assert!(g.running());
        assert!(!g.end_if_over(t0 + 99 * MS));
        assert_eq!(g.left(t0 + 40 * MS), Some(60 * MS));
        assert!(g.end_if_over(t0 + 100 * MS));
        // The claim took them all: the next arrival opens a new window.
        assert!(!g.running() && g.left(t0 + 100 * MS).is_none());
        g.arrived(t0 + 150 * MS);
        assert!(!g.end_if_over(t0 + 200 * MS));
        assert!(g.end_if_over(t0 + 250 * MS));
    }

    #[test]
    fn a_waiter_or_no_window_claims_at_once() {
        let t0 = Instant::now();
        let mut g = Gathering::new(100 * MS);
        g.arrived(t0);
        g.wanted(t0 + 10 * MS);
        assert!(
            g.end_if_over(t0 + 10 * MS),
            "`nixpush wait` does not wait for the window"
        );
        // An arrival after the waiter does not put its claim off.
        g.wanted(t0 + 20 * MS);
        g.arrived(t0 + 20 * MS);
        assert!(g.end_if_over(t0 + 20 * MS));
        let mut none = Gathering::new(Duration::ZERO);
        none.arrived(t0);
        assert!(
            none.end_if_over(t0),
            "gather = 0 claims each build as it comes"
        );
    }
}
