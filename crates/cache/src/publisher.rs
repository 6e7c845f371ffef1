//! Publishing closures: skip what the cache has, upload NARs concurrently, and publish narinfos in
//! reference order.
//!
//! One [`Publisher`] serves any number of pushes at once (the daemon runs one per queued item): a
//! path that several want is probed and uploaded by one of them while the others wait for its
//! result, and paths known to be in the cache are remembered (up to a bound), so dependencies that
//! every build shares are not asked about again.
//!
//! Each push keeps the retention protocol's side (README.md, "Retention"): it writes its session
//! (the paths it publishes or relies on) and looks at the collector's state before it probes; it
//! records a large NAR it finds present in the session, and looks again, before relying on it; and
//! it looks after uploading each NAR and before the narinfo that points to it, uploading the NAR
//! again if a collection may have deleted it meanwhile (or if the narinfo would go up more than
//! half of [`NAR_WINDOW`] after it).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nixpush_format::cache_keys::{
    CONTENT_TYPE_LOG, CONTENT_TYPE_NAR, CONTENT_TYPE_NARINFO, log_key, nar_key, narinfo_key,
};
use nixpush_format::{NarInfo, PathInfo, SecretKey, StorePath};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::CacheError;
use crate::cache::ThreadBudget;
use crate::error_chain;
use crate::fence::{NAR_WINDOW, Observation, Watch};
use crate::probe;
use crate::session::{Session, local_host};
use crate::source::NarSource;
use crate::spool::{CompressOptions, PARALLEL_MIN_NAR, Spool, spool_nar};
use crate::target::Target;

/// What happened to each path, as it happens. The CLI turns these into log lines, a progress bar
/// and JSON; the daemon into log lines.
#[derive(Debug, Clone)]
pub enum Event {
    /// The plan, once the cache has been asked what it already has.
    Planned {
        upload: usize,
        present: usize,
        skipped: usize,
        nar_bytes: u64,
    },
    AlreadyPresent {
        path: StorePath,
    },
    /// Not uploaded: signed by an upstream key the user named.
    Skipped {
        path: StorePath,
        key: String,
    },
    /// Published. `nar_existed`: an identical NAR was already in the cache, so only the narinfo went up.
    Uploaded {
        path: StorePath,
        nar_size: u64,
        file_size: u64,
        nar_existed: bool,
    },
    Failed {
        path: StorePath,
        error: String,
    },
}

pub struct PushOptions {
    /// Large NARs prepared and uploaded at once.
    pub jobs: usize,
    pub keys: Vec<SecretKey>,
    pub skip_signed_by: Vec<String>,
    pub spool_dir: PathBuf,
}

#[derive(Debug, Default)]
pub struct PushSummary {
    pub uploaded: Vec<StorePath>,
    /// In the cache already, or published meanwhile by another push through the same publisher.
    pub present: Vec<StorePath>,
    pub skipped: Vec<StorePath>,
    /// Shared: a path another push had in hand fails all of its pushes with the same error.
    pub failed: Vec<(StorePath, Arc<CacheError>)>,
    pub nar_bytes: u64,
    pub file_bytes: u64,
}

/// A NAR this small (uncompressed) is spooled in memory and sent in one request: its time is round
/// trips, so up to [`SMALL_IN_FLIGHT`] of them go at once, whatever `jobs` says, holding at most
/// [`SMALL_BYTES`] in memory.
const SMALL_NAR: u64 = crate::spool::MEMORY_SPOOL as u64;
/// A closure of 1,000 small paths takes four rounds of requests at this width, not sixteen as at
/// 64: at a 20 ms round trip, 0.24 s less for each of probing and uploading.
const SMALL_IN_FLIGHT: usize = 256;
const SMALL_BYTES: u32 = 64 << 20;
/// Narinfo probes in flight (at least; four per job when `jobs` is larger).
const PROBES_IN_FLIGHT: usize = 256;

/// NARs at least this large (compressed) are only uploaded after asking whether the cache has them.
const ASK_BEFORE_PUT: u64 = 1 << 20;

/// Paths remembered as being in the cache. 100,000 take about 10 MB; a path forgotten is only asked
/// about once more.
const REMEMBERED: usize = 100_000;
/// How long a path is remembered: what another tool deleted from the cache (a retention sweep) is
/// published again, at the latest, after this.
const REMEMBER_FOR: Duration = Duration::from_secs(3600);

/// How a path ended for the push that had it in hand; `None` while it is being probed or uploaded.
type Settled = Option<Result<(), Arc<CacheError>>>;

/// Publishes closures through one cache, for as many pushes at once as its callers start. Cheap to
/// clone; clones share everything.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

struct Shared {
    target: Arc<Target>,
    source: Arc<dyn NarSource>,
    compress: CompressOptions,
    keys: Vec<SecretKey>,
    skip_signed_by: Vec<String>,
    spool_dir: PathBuf,
    /// Slots for large NARs: their spooling (compression) and upload.
    jobs: Semaphore,
    /// Slots for small NARs, and the bytes they may hold, see [`SMALL_NAR`].
    small: Semaphore,
    small_bytes: Semaphore,
    /// Narinfo probes in flight.
    probes: Arc<Semaphore>,
    threads: Arc<ThreadBudget>,
    paths: Mutex<Paths>,
    /// The collector's state, as this publisher follows it.
    watch: Watch,
    /// The look under which what `paths.known` holds was last confirmed.
    memory_checked: Mutex<Observation>,
    host: String,
    /// The session record pushes begun now add to.
    session: Mutex<Arc<SessionRecord>>,
}

/// How often a push writes its session again while it runs.
const SESSION_REFRESH: Duration = Duration::from_secs(15 * 60);

/// Pushes that begin within this time of a session record's opening share it: one object,
/// rewritten as they add to it, rather than one object per push (a daemon's every item), which
/// the bucket would keep for the whole `--keep-within` and every collection would read.
const SESSION_PERIOD: Duration = Duration::from_secs(15 * 60);

/// A session record naming this many paths and NARs takes no new pushes: each write sends the
/// whole record, so on a builder that publishes thousands of paths in a period the bytes would grow
/// with the square of them. At about 35 bytes a name, a write stays under 150 KB (plus what the
/// pushes already in it add).
const SESSION_MAX_NAMES: usize = 4096;

/// A write of a session record older than this is not relied on: a push that finds its paths
/// written writes again anyway, so that what it relies on is named by an object a collection
/// counts as young (after a machine's suspension, say, that no `Instant` saw).
const SESSION_WRITE_TRUSTED: Duration = Duration::from_secs(5 * 60);

/// The session record of the pushes begun within one [`SESSION_PERIOD`]: what they publish or rely
/// on, written before they rely on it, and rewritten when one relies on a NAR it found present.
/// It is always written whole and only ever grows, so a new version of the object is a longer one:
/// a collector that sees no entity tags tells versions apart by size.
struct SessionRecord {
    key: String,
    host: String,
    /// Wall-clock time, which goes on while a machine is suspended.
    opened: SystemTime,
    content: Mutex<SessionContent>,
    /// What the object in the cache holds; writers take turns.
    written: tokio::sync::Mutex<Written>,
}

/// The last write that succeeded: the version of the content it read, when it was made, and when
/// the server acknowledged it.
#[derive(Default)]
struct Written {
    version: u64,
    at: Option<SystemTime>,
    done: Option<Instant>,
}

#[derive(Default)]
struct SessionContent {
    paths: BTreeSet<String>,
    nars: BTreeSet<String>,
    /// Counts the additions: a write covers those made before it read the content.
    version: u64,
}

/// Tells apart the records one host opens in one millisecond: random, so that two processes do not
/// collide, and counted, so that one process never does (full records are replaced at once).
fn session_id() -> u64 {
    static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    getrandom::u64().unwrap_or_default().wrapping_add(n)
}

impl SessionRecord {
    fn open(host: &str) -> Self {
        let opened = SystemTime::now();
        let started = opened
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        SessionRecord {
            key: Session::key(host, started, session_id()),
            host: host.to_owned(),
            opened,
            content: Mutex::default(),
            written: tokio::sync::Mutex::default(),
        }
    }

    /// Whether pushes beginning now may still join this record: young, and not full.
    fn open_to_new_pushes(&self) -> bool {
        let names = {
            let content = self.content();
            content.paths.len() + content.nars.len()
        };
        self.opened.elapsed().is_ok_and(|age| age < SESSION_PERIOD) && names < SESSION_MAX_NAMES
    }

    fn content(&self) -> std::sync::MutexGuard<'_, SessionContent> {
        self.content.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a push's closure (and the known paths its walk stopped at); returns the version the
    /// object must hold before the push relies on them.
    fn add_paths(&self, closure: &[PathInfo], skipped: &[StorePath]) -> u64 {
        let mut content = self.content();
        let before = content.paths.len();
        content.paths.extend(
            closure
                .iter()
                .flat_map(|i| std::iter::once(&i.path).chain(&i.references))
                .chain(skipped)
                .map(|p| p.hash_part().to_owned()),
        );
        if content.paths.len() != before {
            content.version += 1;
        }
        content.version
    }

    /// Makes the object hold at least `version`: written by this call, or by a recent one that
    /// read the content after that version was reached. Returns when that write was acknowledged:
    /// a look at the collector begun since then is one begun after the session held the paths,
    /// which pushes gathered together share, although they got here one after another.
    async fn flush(&self, target: &Target, version: u64) -> Result<Instant, CacheError> {
        let mut written = self.written.lock().await;
        let recent = written
            .at
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|age| age < SESSION_WRITE_TRUSTED);
        match written.done {
            Some(done) if written.version >= version && version > 0 && recent => Ok(done),
            _ => self.write_locked(target, &mut written).await,
        }
    }

    /// Writes the object again, so that its date is now (while a long push relies on it).
    async fn rewrite(&self, target: &Target) -> Result<(), CacheError> {
        let mut written = self.written.lock().await;
        self.write_locked(target, &mut written).await.map(drop)
    }

    async fn write_locked(
        &self,
        target: &Target,
        written: &mut Written,
    ) -> Result<Instant, CacheError> {
        let (body, version) = {
            let content = self.content();
            let session = Session {
                host: self.host.clone(),
                paths: content.paths.iter().cloned().collect(),
                nars: content.nars.iter().cloned().collect(),
            };
            let body = serde_json::to_vec(&session).expect("a session serializes");
            (body, content.version)
        };
        let at = SystemTime::now();
        target
            .put_bytes(&self.key, body, "application/json")
            .await?;
        let done = Instant::now();
        *written = Written {
            version,
            at: Some(at),
            done: Some(done),
        };
        Ok(done)
    }

    /// Adds a NAR relied on, and has the object hold it (see [`SessionRecord::flush`]).
    async fn add_nar(&self, target: &Target, nar: &str) -> Result<Instant, CacheError> {
        let version = {
            let mut content = self.content();
            if content.nars.insert(nar.to_owned()) {
                content.version += 1;
            }
            content.version
        };
        self.flush(target, version).await
    }
}

struct Paths {
    /// Paths some push is probing or uploading: others that want them wait for its result.
    in_hand: HashMap<StorePath, watch::Receiver<Settled>>,
    known: Remembered,
}

impl Shared {
    fn paths(&self) -> std::sync::MutexGuard<'_, Paths> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session record for a push begun now: the current one, or a new one once its period is
    /// over or it is full (pushes still relying on the old one keep it fresh themselves).
    fn session(&self) -> Arc<SessionRecord> {
        let mut current = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if !current.open_to_new_pushes() {
            *current = Arc::new(SessionRecord::open(&self.host));
        }
        current.clone()
    }
}

/// A path this push has taken in hand: published, found present, or failed, it is settled once,
/// and the pushes waiting for it learn how. Dropped unsettled (its push was cancelled), it is
/// released and they learn that it was abandoned.
struct InHand {
    path: StorePath,
    tx: watch::Sender<Settled>,
    shared: Arc<Shared>,
    settled: bool,
}

impl InHand {
    fn settle(mut self, result: Result<(), Arc<CacheError>>) {
        {
            let mut paths = self.shared.paths();
            paths.in_hand.remove(&self.path);
            if result.is_ok() {
                paths.known.insert(&self.path);
            }
        }
        self.tx.send_replace(Some(result));
        self.settled = true;
    }
}

impl Drop for InHand {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.paths().in_hand.remove(&self.path);
        }
    }
}

impl Publisher {
    pub(crate) fn new(
        target: Arc<Target>,
        threads: Arc<ThreadBudget>,
        compress: CompressOptions,
        source: Arc<dyn NarSource>,
        opts: &PushOptions,
    ) -> Self {
        let host = local_host();
        Publisher {
            shared: Arc::new(Shared {
                source,
                compress,
                keys: opts.keys.clone(),
                skip_signed_by: opts.skip_signed_by.clone(),
                spool_dir: opts.spool_dir.clone(),
                jobs: Semaphore::new(opts.jobs.max(1)),
                small: Semaphore::new(SMALL_IN_FLIGHT),
                small_bytes: Semaphore::new(SMALL_BYTES as usize),
                probes: Arc::new(Semaphore::new((opts.jobs * 4).max(PROBES_IN_FLIGHT))),
                threads,
                paths: Mutex::new(Paths {
                    in_hand: HashMap::new(),
                    known: Remembered::new(REMEMBERED, REMEMBER_FOR),
                }),
                watch: Watch::new(target.clone()),
                memory_checked: Mutex::new(Observation::NEVER),
                session: Mutex::new(Arc::new(SessionRecord::open(&host))),
                host,
                target,
            }),
        }
    }

    /// Whether `path` is known to be in the cache (this publisher published it or found it there).
    /// Its closure is then there too, so a caller computing closures need not look past it.
    pub fn is_known(&self, path: &StorePath) -> bool {
        self.shared.paths().known.contains(path)
    }

    /// Uploads `text` as the build log of `drv`, replacing an earlier one: after a rebuild, the log
    /// that describes the outputs now published.
    pub async fn put_log(&self, drv: &StorePath, text: Vec<u8>) -> Result<(), CacheError> {
        self.shared
            .target
            .put_bytes(&log_key(drv), text, CONTENT_TYPE_LOG)
            .await
    }

    /// Publishes every path of `closure` (a closure: every reference of a member is a member, or
    /// known to be in the cache, see [`Publisher::is_known`]). `fresh` paths are asked about even
    /// if known: they were just built (again), and the cache may have lost them since. Never fails
    /// as a whole: each path ends uploaded, present, skipped or failed with its reason.
    pub async fn push(
        &self,
        closure: Vec<PathInfo>,
        fresh: &[StorePath],
        on_event: &(dyn Fn(Event) + Send + Sync),
    ) -> PushSummary {
        let sh = &self.shared;
        let mut summary = PushSummary::default();
        let mut candidates = Vec::new();
        for info in closure {
            match info
                .sigs
                .iter()
                .find(|s| sh.skip_signed_by.iter().any(|k| k == s.key_name()))
            {
                Some(sig) => {
                    on_event(Event::Skipped {
                        path: info.path.clone(),
                        key: sig.key_name().to_owned(),
                    });
                    summary.skipped.push(info.path);
                }
                None => candidates.push(info),
            }
        }

        // The session, then a look at the collector: whatever this push relies on from here on is
        // named in a session that a collection's second mark sees, or is looked at after that
        // collection's deletions.
        let record = sh.session();
        let version = record.add_paths(&candidates, &summary.skipped);
        let looked = async {
            let held = record.flush(&sh.target, version).await?;
            sh.watch.look_after(held).await
        };
        // A collection keeps sessions younger than its --keep-within (an hour at least): one
        // that runs long is written again, so that it never ages out while the push relies on it.
        // Dropped when the push ends, which stops the refresh between writes, never in the middle
        // of one: a request cancelled on the way could still reach the server after a later
        // write and put an older record back.
        let (_refresh, mut push_ended) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn({
            let (record, target) = (record.clone(), sh.target.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(SESSION_REFRESH) => {}
                        _ = &mut push_ended => return,
                    }
                    if let Err(e) = record.rewrite(&target).await {
                        tracing::warn!(error = %error_chain(&e), "cannot write the push's session again");
                    }
                }
            }
        });
        let looked = match looked.await {
            Ok(looked) => looked,
            Err(e) => {
                let e = Arc::new(e);
                for info in candidates {
                    on_event(Event::Failed {
                        path: info.path.clone(),
                        error: error_chain(&*e),
                    });
                    summary.failed.push((info.path, e.clone()));
                }
                return summary;
            }
        };
        sh.check_memory(looked);

        // Each path is in another push's hands, known, or taken in hand by this one. A reference
        // outside the closure (known when the closure was walked) is waited for if some push has
        // it in hand again (being uploaded anew), and not trusted if it is no longer known (the
        // memory lapsed, or was cleared because the cache lost a path): the item walks again.
        let in_closure: HashSet<StorePath> = candidates
            .iter()
            .map(|i| &i.path)
            .chain(&summary.skipped)
            .cloned()
            .collect();
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        let mut outside = HashMap::new();
        let mut forgotten = HashSet::new();
        let mut known = Vec::new();
        let mut fresh_known = HashSet::new();
        {
            let mut paths = sh.paths();
            // What an upstream cache serves is as good as present for the closures that need it.
            for p in &summary.skipped {
                paths.known.insert(p);
            }
            for info in &candidates {
                for r in info.references.iter().filter(|r| !in_closure.contains(r)) {
                    if let Some(rx) = paths.in_hand.get(r) {
                        outside.insert(r.clone(), rx.clone());
                    } else if !paths.known.contains(r) {
                        forgotten.insert(r.clone());
                    }
                }
            }
            for info in candidates {
                if let Some(rx) = paths.in_hand.get(&info.path) {
                    theirs.push((info.path, rx.clone()));
                } else if paths.known.contains(&info.path) && !fresh.contains(&info.path) {
                    known.push(info.path);
                } else {
                    if paths.known.contains(&info.path) {
                        fresh_known.insert(info.path.clone());
                    }
                    let (tx, rx) = watch::channel(None);
                    paths.in_hand.insert(info.path.clone(), rx);
                    let hand = InHand {
                        path: info.path.clone(),
                        tx,
                        shared: sh.clone(),
                        settled: false,
                    };
                    mine.push((info, hand));
                }
            }
        }
        for path in known {
            on_event(Event::AlreadyPresent { path: path.clone() });
            summary.present.push(path);
        }

        // Ask the cache what it has, many at once: on S3 each question is a round trip.
        let mut present = probe::present(
            &sh.target,
            &sh.probes,
            mine.iter().map(|(i, _)| narinfo_key(&i.path)).collect(),
        )
        .await;
        let mut upload = Vec::new();
        let mut unavailable = HashSet::new();
        let mut trust_outside = true;
        for (info, hand) in mine {
            let has = present
                .remove(&narinfo_key(&info.path))
                .expect("every path probed");
            match (info, hand, has) {
                (info, hand, Ok(true)) => {
                    hand.settle(Ok(()));
                    on_event(Event::AlreadyPresent {
                        path: info.path.clone(),
                    });
                    summary.present.push(info.path);
                }
                (info, hand, Ok(false)) => {
                    if fresh_known.contains(&info.path) {
                        // Remembered, yet gone: the cache was changed behind this publisher's
                        // back, and what it remembers cannot be trusted. Neither can the
                        // references outside this closure, which were not walked because they
                        // were remembered: the item walks again.
                        tracing::warn!(path = %info.path, "a path remembered in the cache is gone from it; forgetting what the cache was known to hold");
                        sh.paths().known.clear();
                        trust_outside = false;
                    }
                    upload.push((info, hand))
                }
                (info, hand, Err(e)) => {
                    let failed = Failed {
                        summary: &mut summary,
                        unavailable: &mut unavailable,
                        on_event,
                    };
                    failed.record(info.path, hand, e);
                }
            }
        }
        tracing::debug!(
            missing = upload.len(),
            present = summary.present.len(),
            elsewhere = theirs.len(),
            "cache probed"
        );
        let (upload, cyclic) = dependencies_first(upload);
        let in_cycle: HashSet<StorePath> = cyclic.iter().map(|(i, _)| i.path.clone()).collect();
        for (info, hand) in cyclic {
            // A reference that is itself held up: in the cycle, or depending on it.
            let reference = info
                .references
                .iter()
                .find(|r| **r != info.path && in_cycle.contains(*r))
                .cloned()
                .unwrap_or(info.path.clone());
            let e = CacheError::ReferenceFailed {
                path: info.path.clone(),
                reference,
            };
            let failed = Failed {
                summary: &mut summary,
                unavailable: &mut unavailable,
                on_event,
            };
            failed.record(info.path, hand, e);
        }
        on_event(Event::Planned {
            upload: upload.len(),
            present: summary.present.len(),
            skipped: summary.skipped.len(),
            nar_bytes: upload.iter().map(|(i, _)| i.nar_size).sum(),
        });

        let mut pending: HashMap<StorePath, watch::Receiver<Settled>> = theirs
            .iter()
            .map(|(p, rx)| (p.clone(), rx.clone()))
            .chain(outside)
            .collect();
        for (info, hand) in &upload {
            pending.insert(info.path.clone(), hand.tx.subscribe());
        }
        let mut tasks = JoinSet::new();
        for (info, hand) in upload {
            let deps = info
                .references
                .iter()
                .filter(|r| **r != info.path)
                .map(|r| match pending.get(r) {
                    Some(rx) => Dep::Pending(r.clone(), rx.clone()),
                    None if unavailable.contains(r) => Dep::Failed(r.clone()),
                    None if forgotten.contains(r)
                        || (!trust_outside && !in_closure.contains(r)) =>
                    {
                        Dep::Forgotten(r.clone())
                    }
                    None => Dep::Available,
                })
                .collect();
            let (sh, record) = (sh.clone(), record.clone());
            tasks.spawn(async move {
                let result = sh
                    .publish(&info, deps, looked, &record)
                    .await
                    .map_err(Arc::new);
                hand.settle(result.as_ref().map(|_| ()).map_err(Arc::clone));
                (info, result)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (info, result) = joined.expect("publish task panicked");
            match result {
                Ok(up) => {
                    summary.nar_bytes += info.nar_size;
                    summary.file_bytes += up.file_size;
                    on_event(Event::Uploaded {
                        path: info.path.clone(),
                        nar_size: info.nar_size,
                        file_size: up.file_size,
                        nar_existed: up.nar_existed,
                    });
                    summary.uploaded.push(info.path);
                }
                Err(e) => {
                    on_event(Event::Failed {
                        path: info.path.clone(),
                        error: error_chain(&*e),
                    });
                    summary.failed.push((info.path, e));
                }
            }
        }
        for (path, mut rx) in theirs {
            let settled = rx.wait_for(Option::is_some).await.map(|v| v.clone());
            match settled {
                Ok(Some(Ok(()))) => {
                    on_event(Event::AlreadyPresent { path: path.clone() });
                    summary.present.push(path);
                }
                Ok(Some(Err(e))) => {
                    on_event(Event::Failed {
                        path: path.clone(),
                        error: error_chain(&*e),
                    });
                    summary.failed.push((path, e));
                }
                Ok(None) | Err(_) => {
                    let e = Arc::new(CacheError::Abandoned { path: path.clone() });
                    on_event(Event::Failed {
                        path: path.clone(),
                        error: error_chain(&*e),
                    });
                    summary.failed.push((path, e));
                }
            }
        }
        summary
    }
}

type Tagged<T> = Vec<(PathInfo, T)>;

/// Where a path of this push that cannot even be uploaded is recorded: its waiters, the caller and
/// the summary learn why, and paths that reference it fail without uploading.
struct Failed<'a> {
    summary: &'a mut PushSummary,
    unavailable: &'a mut HashSet<StorePath>,
    on_event: &'a (dyn Fn(Event) + Send + Sync),
}

impl Failed<'_> {
    fn record(self, path: StorePath, hand: InHand, e: CacheError) {
        let e = Arc::new(e);
        hand.settle(Err(e.clone()));
        (self.on_event)(Event::Failed {
            path: path.clone(),
            error: error_chain(&*e),
        });
        self.unavailable.insert(path.clone());
        self.summary.failed.push((path, e));
    }
}

enum Dep {
    /// Being published, by this push or another: wait for it.
    Pending(StorePath, watch::Receiver<Settled>),
    /// Could not even be checked: this path cannot be published either.
    Failed(StorePath),
    /// Outside the closure, and no longer known to be in the cache: not to be trusted.
    Forgotten(StorePath),
    /// In the cache, or skipped because an upstream cache has it.
    Available,
}

impl Dep {
    /// Why `path` cannot be published, if a reference already says so.
    fn known_failure(&self, path: &StorePath) -> Option<CacheError> {
        let failed = |r: &StorePath| CacheError::ReferenceFailed {
            path: path.clone(),
            reference: r.clone(),
        };
        match self {
            Dep::Failed(r) => Some(failed(r)),
            Dep::Pending(r, rx) if matches!(*rx.borrow(), Some(Err(_))) => Some(failed(r)),
            Dep::Forgotten(r) => Some(CacheError::ReferenceForgotten {
                path: path.clone(),
                reference: r.clone(),
            }),
            _ => None,
        }
    }
}

struct Published {
    file_size: u64,
    nar_existed: bool,
}

impl Shared {
    /// Forgets what the cache was known to hold if a collection may have deleted since that was
    /// last confirmed.
    fn check_memory(&self, looked: Observation) {
        let mut checked = self
            .memory_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A later look has confirmed it already.
        if looked.seq < checked.seq {
            return;
        }
        if looked.deleted_since(&checked) {
            tracing::info!(
                collection = looked.seq,
                "a collection ran since the cache was last looked at; forgetting what it held"
            );
            self.paths().known.clear();
        }
        *checked = looked;
    }

    /// Uploads a NAR, then looks at the collector: if a collection may have deleted since
    /// `looked` (the look before), the NAR may be gone, and goes up again. Returns when the
    /// upload that counts began, and the last look.
    async fn put_nar(
        &self,
        key: &str,
        spool: &Spool,
        file_size: u64,
        file_hash: nixpush_format::Sha256,
        mut looked: Observation,
    ) -> Result<(Instant, Observation), CacheError> {
        loop {
            let began = Instant::now();
            match spool {
                Spool::Memory(bytes) => {
                    self.target
                        .put_bytes(key, bytes.clone(), CONTENT_TYPE_NAR)
                        .await?
                }
                Spool::File(f) => {
                    self.target
                        .put_file(key, f.path(), file_size, file_hash, CONTENT_TYPE_NAR)
                        .await?
                }
            }
            let seen = self.watch.look_after(Instant::now()).await?;
            if !seen.deleted_since(&looked) {
                return Ok((began, seen));
            }
            tracing::info!(
                nar = key,
                "a collection ran while the NAR went up; uploading it again"
            );
            looked = seen;
        }
    }

    async fn publish(
        self: &Arc<Self>,
        info: &PathInfo,
        deps: Vec<Dep>,
        looked: Observation,
        record: &SessionRecord,
    ) -> Result<Published, CacheError> {
        // A reference that has already failed dooms this path: do not upload a NAR nobody can use.
        if let Some(e) = deps.iter().find_map(|d| d.known_failure(&info.path)) {
            return Err(e);
        }
        let awaited: Vec<(StorePath, watch::Receiver<Settled>)> = deps
            .into_iter()
            .filter_map(|d| match d {
                Dep::Pending(r, rx) => Some((r, rx)),
                Dep::Failed(_) | Dep::Forgotten(_) | Dep::Available => None,
            })
            .collect();
        // The job slot covers the NAR only; waiting for references below must not hold one, or a
        // path could wait on a reference that waits for a slot.
        let (mut narinfo, published, uploaded) = {
            // Small NARs (most of any closure) are latency, not bandwidth or CPU: a round trip
            // each, many at once, outside the `jobs` that bound large ones.
            let _slot = if info.nar_size <= SMALL_NAR {
                let slot = self.small.acquire().await.expect("semaphore closed");
                let bytes = info.nar_size.max(1) as u32;
                let held = self.small_bytes.acquire_many(bytes).await;
                (slot, Some(held.expect("semaphore closed")))
            } else {
                (self.jobs.acquire().await.expect("semaphore closed"), None)
            };
            // One compression thread from the shared budget and, for a NAR large enough to
            // compress in parallel, more when they are free (never waiting for them).
            let want = if info.nar_size >= PARALLEL_MIN_NAR {
                self.compress.threads
            } else {
                1
            };
            let threads = self.threads.acquire(want).await;
            let compress = CompressOptions {
                threads: threads.num_permits() as u32,
                ..self.compress
            };
            let this = self.clone();
            let job_info = info.clone();
            let spooled = tokio::task::spawn_blocking(move || {
                let spooled = spool_nar(&job_info, &*this.source, &compress, &this.spool_dir);
                drop(threads);
                spooled
            })
            .await
            .expect("NAR spooling panicked")?;
            let key = nar_key(&spooled.file_hash, spooled.compression);
            // Content-addressed: an object with this name was written with these exact bytes, so a
            // large one is not sent again, provided its size matches: one a server acknowledged
            // and then lost the end of (or a crashed copy left short) is replaced. For a small NAR
            // the question costs as much as the answer, and rewriting identical bytes is harmless.
            // A large NAR is named in the session, and the collector looked at, before the cache
            // is asked for it: found present, it is relied on; uploaded (many parts, dated by the
            // server maybe from the first), its narinfo may go up long after its date. Either way
            // the session keeps it.
            let nar_existed = if spooled.file_size >= ASK_BEFORE_PUT {
                let held = record.add_nar(&self.target, &key).await?;
                self.watch.look_after(held).await?;
                self.target.size(&key).await? == Some(spooled.file_size)
            } else {
                false
            };
            let uploaded = if nar_existed {
                None
            } else {
                Some(
                    self.put_nar(
                        &key,
                        &spooled.spool,
                        spooled.file_size,
                        spooled.file_hash,
                        looked,
                    )
                    .await?,
                )
            };
            let mut references = info.references.clone();
            references.sort();
            let narinfo = NarInfo {
                store_path: info.path.clone(),
                url: key,
                compression: spooled.compression.as_str().to_owned(),
                file_hash: Some(spooled.file_hash),
                file_size: Some(spooled.file_size),
                nar_hash: spooled.nar_hash,
                nar_size: spooled.nar_size,
                references,
                deriver: info.deriver.clone(),
                sigs: info.sigs.clone(),
                ca: info.ca.clone(),
            };
            (
                narinfo,
                Published {
                    file_size: spooled.file_size,
                    nar_existed,
                },
                uploaded.map(|u| (u, spooled)),
            )
        };
        // Signed before the wait: once the references are published, only the PUT is left on the
        // chain that every level of the closure waits for.
        for key in &self.keys {
            // NarSize was checked non-zero against the real NAR above, so signing cannot fail.
            narinfo.sign(key).map_err(|e| CacheError::Source {
                path: info.path.clone(),
                message: e.to_string(),
            })?;
        }
        let text = narinfo.to_string().into_bytes();
        for (reference, mut rx) in awaited {
            let ok = rx
                .wait_for(Option::is_some)
                .await
                .is_ok_and(|v| matches!(*v, Some(Ok(()))));
            if !ok {
                return Err(CacheError::ReferenceFailed {
                    path: info.path.clone(),
                    reference,
                });
            }
        }
        // The collector keeps a NAR younger than NAR_WINDOW, or one a narinfo points to: a
        // narinfo going up much later than its NAR needs the NAR uploaded again.
        if let Some(((began, seen), spooled)) = uploaded
            && began.elapsed() > NAR_WINDOW / 2
        {
            self.put_nar(
                &narinfo.url,
                &spooled.spool,
                spooled.file_size,
                spooled.file_hash,
                seen,
            )
            .await?;
        }
        let key = narinfo_key(&info.path);
        self.target
            .put_bytes(&key, text, CONTENT_TYPE_NARINFO)
            .await?;
        Ok(published)
    }
}

/// Orders paths so that each comes after the members it references (Kahn's algorithm). The
/// semaphore hands out job slots in this order, so narinfos can go up while later NARs upload.
/// Returns the ordered paths, and apart those in a reference cycle. `T` rides along with each.
fn dependencies_first<T>(paths: Vec<(PathInfo, T)>) -> (Tagged<T>, Tagged<T>) {
    let index: HashMap<StorePath, usize> = paths
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.path.clone(), i))
        .collect();
    let mut waiting_on = vec![0usize; paths.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); paths.len()];
    for (i, (p, _)) in paths.iter().enumerate() {
        for r in p.references.iter().filter(|r| **r != p.path) {
            if let Some(&j) = index.get(r) {
                waiting_on[i] += 1;
                dependents[j].push(i);
            }
        }
    }
    let mut ready: VecDeque<usize> = (0..paths.len()).filter(|&i| waiting_on[i] == 0).collect();
    let mut order = Vec::with_capacity(paths.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &d in &dependents[i] {
            waiting_on[d] -= 1;
            if waiting_on[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    // Real store paths cannot reference each other in a cycle (a path's hash covers its references'
    // hashes). Paths that do would wait on each other forever, so they are returned apart, to fail.
    let mut slots: Vec<Option<(PathInfo, T)>> = paths.into_iter().map(Some).collect();
    let ordered = order.into_iter().filter_map(|i| slots[i].take()).collect();
    (ordered, slots.into_iter().flatten().collect())
}

/// A set of store paths that forgets each after [`REMEMBER_FOR`], and the oldest beyond its bound.
/// Paths are kept by their hash part (the rest of a path follows from it in one store).
struct Remembered {
    when: HashMap<[u8; 32], Instant>,
    order: VecDeque<[u8; 32]>,
    bound: usize,
    ttl: Duration,
}

impl Remembered {
    fn new(bound: usize, ttl: Duration) -> Self {
        Remembered {
            when: HashMap::new(),
            order: VecDeque::new(),
            bound,
            ttl,
        }
    }

    fn key(path: &StorePath) -> [u8; 32] {
        let mut key = [0; 32];
        key.copy_from_slice(path.hash_part().as_bytes());
        key
    }

    fn insert(&mut self, path: &StorePath) {
        let key = Self::key(path);
        if self.when.insert(key, Instant::now()).is_none() {
            self.order.push_back(key);
            if self.order.len() > self.bound
                && let Some(oldest) = self.order.pop_front()
            {
                self.when.remove(&oldest);
            }
        }
    }

    fn clear(&mut self) {
        self.when.clear();
        self.order.clear();
    }

    fn contains(&self, path: &StorePath) -> bool {
        self.when
            .get(&Self::key(path))
            .is_some_and(|t| t.elapsed() < self.ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SESSIONS_PREFIX;
    use crate::{Cache, StoreUrl};
    use nixpush_format::Sha256;

    /// A path whose hash part is derived from its name, so that names tell paths apart.
    fn store_path(name: &str) -> StorePath {
        let hash = Sha256::digest(name.as_bytes()).to_nix32();
        StorePath::from_base_name(&format!("{}-{name}", &hash[..32])).unwrap()
    }

    fn info(name: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: store_path(name),
            deriver: None,
            nar_hash: Sha256([0; 32]),
            nar_size: 8,
            references: refs.iter().map(|r| store_path(r)).collect(),
            registration_time: 0,
            ultimate: false,
            sigs: vec![],
            ca: None,
        }
    }

    /// Serves NARs of regular files holding the path's name; counts how many are being written at
    /// once and in all, and can hold every write until told to go on.
    #[derive(Default)]
    struct Source {
        now: std::sync::atomic::AtomicUsize,
        max: std::sync::atomic::AtomicUsize,
        reads: std::sync::atomic::AtomicUsize,
        hold: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl NarSource for Source {
        fn write_nar(
            &self,
            path: &StorePath,
            out: &mut dyn std::io::Write,
        ) -> Result<(), crate::SourceError> {
            use std::sync::atomic::Ordering::SeqCst;
            self.reads.fetch_add(1, SeqCst);
            if let Some(rx) = &*self.hold.lock().unwrap() {
                let _ = rx.recv();
            }
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.max.fetch_max(n, SeqCst);
            // Long enough for every job to be compressing at once, were it allowed to.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let r = out.write_all(&nar_of(path.name()));
            self.now.fetch_sub(1, SeqCst);
            Ok(r?)
        }
    }

    fn nar_of(name: &str) -> Vec<u8> {
        let mut nar = Vec::new();
        let file = nixpush_format::nar::Node::Regular {
            executable: false,
            contents: name.as_bytes().to_vec(),
        };
        nixpush_format::nar::write_node(&file, &mut nar).unwrap();
        nar
    }

    /// A path whose NAR is what [`Source`] serves.
    fn real(name: &str, refs: &[&str]) -> PathInfo {
        let nar = nar_of(name);
        PathInfo {
            nar_hash: Sha256::digest(&nar),
            nar_size: nar.len() as u64,
            ..info(name, refs)
        }
    }

    fn opts(dir: &std::path::Path, jobs: usize) -> PushOptions {
        PushOptions {
            jobs,
            keys: vec![],
            skip_signed_by: vec![],
            spool_dir: dir.to_owned(),
        }
    }

    async fn file_cache(dir: &std::path::Path) -> Cache {
        let url: StoreUrl = format!("file://{}/cache", dir.display()).parse().unwrap();
        Cache::open(url).await.unwrap()
    }

    /// Pushes share a session record: a write covers what was added before it; a push whose paths
    /// a recent write holds writes nothing; an old write is not relied on.
    #[tokio::test]
    async fn a_shared_session_is_written_when_it_lacks_a_push_or_its_write_is_old() {
        let dir = tempfile::tempdir().unwrap();
        let url: StoreUrl = format!("file://{}/cache", dir.path().display())
            .parse()
            .unwrap();
        let target = Target::open(&url, None, None).await.unwrap();
        let record = SessionRecord::open("builder");
        let object = dir.path().join("cache").join(&record.key);
        let read =
            || -> Session { serde_json::from_slice(&std::fs::read(&object).unwrap()).unwrap() };
        let a = info("a", &["b"]);
        let v = record.add_paths(std::slice::from_ref(&a), &[]);
        let before = Instant::now();
        let held = record.flush(&target, v).await.unwrap();
        assert!(held >= before);
        let hashes = |names: &[&str]| -> Vec<String> {
            let mut h: Vec<String> = names
                .iter()
                .map(|n| store_path(n).hash_part().to_owned())
                .collect();
            h.sort();
            h
        };
        assert_eq!(read().paths, hashes(&["a", "b"]));
        // The same paths again: the write a moment ago holds them, nothing is written.
        std::fs::remove_file(&object).unwrap();
        let again = record.add_paths(std::slice::from_ref(&a), &[]);
        assert_eq!(again, v);
        // A look at the collector need only begin after that write.
        assert_eq!(record.flush(&target, again).await.unwrap(), held);
        assert!(!object.exists(), "written again for nothing");
        // Once that write is older than can be trusted, it is made again.
        record.written.lock().await.at = Some(SystemTime::now() - SESSION_WRITE_TRUSTED);
        assert!(record.flush(&target, again).await.unwrap() > held);
        assert_eq!(read().paths, hashes(&["a", "b"]));
        // Another push's paths and a NAR relied on are added to the same object.
        let c = info("c", &[]);
        let v = record.add_paths(std::slice::from_ref(&c), &[store_path("d")]);
        record.flush(&target, v).await.unwrap();
        record.add_nar(&target, "nar/x.nar.zst").await.unwrap();
        let session = read();
        assert_eq!(session.paths, hashes(&["a", "b", "c", "d"]));
        assert_eq!(session.nars, ["nar/x.nar.zst"]);
        assert_eq!(session.host, "builder");
    }

    /// Regression: a directory cache had no `log/`, so every log upload (and with it every built
    /// item) failed. A cache an earlier version made gets one when opened.
    #[tokio::test]
    async fn build_logs_go_to_log_in_a_directory_cache_old_or_new() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cache/nar")).unwrap();
        let cache = file_cache(dir.path()).await;
        let drv = store_path("hello.drv");
        cache.put_log(&drv, b"built\n".to_vec()).await.unwrap();
        let publisher = cache.publisher(Arc::new(Source::default()), &opts(dir.path(), 1));
        publisher.put_log(&drv, b"again\n".to_vec()).await.unwrap();
        let file = dir.path().join("cache").join(log_key(&drv));
        assert_eq!(std::fs::read(file).unwrap(), b"again\n");
    }

    /// Regression: every job compressed with its own threads, so threads (and compressor memory)
    /// grew with cores × jobs. Compressions now share one budget of threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn compressions_share_one_thread_budget_whatever_the_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = file_cache(dir.path()).await.with_compression_threads(3);
        let closure: Vec<PathInfo> = (0..48).map(|i| real(&format!("budget-{i}"), &[])).collect();
        let source = Arc::new(Source::default());
        let summary = cache
            .push(closure, source.clone(), &opts(dir.path(), 32), &|_| {})
            .await;
        assert_eq!(summary.uploaded.len(), 48, "{:?}", summary.failed);
        let max = source.max.load(std::sync::atomic::Ordering::SeqCst);
        assert!(max <= 3, "{max} compressions at once with a budget of 3");
        assert!(max >= 2, "the budget was never used in parallel");
    }

    /// Two pushes that share a dependency, started together: its NAR is read (and uploaded) once,
    /// both end with it published, and a third push later neither reads nor probes it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pushes_through_one_publisher_share_their_paths() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        // Threads for all three NARs at once, whatever the machine's cores.
        let cache = file_cache(dir.path()).await.with_compression_threads(3);
        let source = Arc::new(Source::default());
        let (go, hold) = std::sync::mpsc::channel();
        *source.hold.lock().unwrap() = Some(hold);
        let publisher = cache.publisher(source.clone(), &opts(dir.path(), 4));
        let shared = || real("shared", &[]);
        let a = vec![shared(), real("left", &["shared"])];
        let b = vec![shared(), real("right", &["shared"])];
        let (p1, p2) = (publisher.clone(), publisher.clone());
        let first = tokio::spawn(async move { p1.push(a, &[], &|_| {}).await });
        let second = tokio::spawn(async move { p2.push(b, &[], &|_| {}).await });
        // Every NAR read waits for a go: both pushes have taken their paths in hand by now.
        while source.reads.load(SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        drop(go);
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        assert!(first.failed.is_empty() && second.failed.is_empty());
        assert_eq!(first.uploaded.len() + second.uploaded.len(), 3);
        assert_eq!(first.present.len() + second.present.len(), 1);
        assert_eq!(
            source.reads.load(SeqCst),
            3,
            "the shared NAR was read twice"
        );
        assert!(publisher.is_known(&store_path("shared")));

        let summary = publisher
            .push(vec![shared(), real("third", &["shared"])], &[], &|_| {})
            .await;
        assert_eq!(summary.uploaded, vec![store_path("third")]);
        assert_eq!(summary.present, vec![store_path("shared")]);
        assert_eq!(source.reads.load(SeqCst), 4);
    }

    /// A session record that names [`SESSION_MAX_NAMES`] takes no new push: the next one opens a
    /// record of its own, so that no write grows without bound; until then pushes share one.
    #[tokio::test]
    async fn a_full_session_record_takes_no_new_push() {
        let dir = tempfile::tempdir().unwrap();
        let cache = file_cache(dir.path()).await;
        let publisher = cache.publisher(Arc::new(Source::default()), &opts(dir.path(), 4));
        let sessions = || -> Vec<Session> {
            let mut found = Vec::new();
            for host in std::fs::read_dir(dir.path().join("cache").join(SESSIONS_PREFIX)).unwrap() {
                for f in std::fs::read_dir(host.unwrap().path()).unwrap() {
                    found.push(
                        serde_json::from_slice(&std::fs::read(f.unwrap().path()).unwrap()).unwrap(),
                    );
                }
            }
            found
        };
        let hash = |name: &str| store_path(name).hash_part().to_owned();
        for name in ["one", "two"] {
            let s = publisher.push(vec![real(name, &[])], &[], &|_| {}).await;
            assert!(s.failed.is_empty(), "{:?}", s.failed);
        }
        assert_eq!(sessions().len(), 1, "the two pushes share one record");
        let full = publisher.shared.session();
        let filled = {
            let mut content = full.content();
            content
                .paths
                .extend((0..SESSION_MAX_NAMES).map(|i| format!("{i:032}")));
            content.version += 1;
            content.version
        };
        full.flush(&publisher.shared.target, filled).await.unwrap();
        let s = publisher.push(vec![real("three", &[])], &[], &|_| {}).await;
        assert!(s.failed.is_empty(), "{:?}", s.failed);
        let mut found = sessions();
        found.sort_by_key(|s| s.paths.len());
        assert_eq!(found.len(), 2, "a full record took a new push");
        assert_eq!(found[0].paths, [hash("three")]);
        assert_eq!(found[1].paths.len(), SESSION_MAX_NAMES + 2);
        assert!(!found[1].paths.contains(&hash("three")));
        assert!(!Arc::ptr_eq(&full, &publisher.shared.session()));
    }

    /// A push whose paths a recent session write holds relies on a look at the collector begun
    /// after that write, whoever made it: it does not read the state again. Here the state object
    /// is damaged after the first push, so a read would refuse it; a push with a path the session
    /// lacks writes it again and must read anew.
    #[tokio::test]
    async fn pushes_one_session_write_covers_share_the_look_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = file_cache(dir.path()).await;
        let publisher = cache.publisher(Arc::new(Source::default()), &opts(dir.path(), 4));
        let first = publisher.push(vec![real("first", &[])], &[], &|_| {}).await;
        assert!(first.failed.is_empty(), "{:?}", first.failed);
        let state = dir.path().join("cache").join(crate::fence::STATE_KEY);
        std::fs::create_dir_all(state.parent().unwrap()).unwrap();
        std::fs::write(&state, b"not json").unwrap();
        let again = publisher.push(vec![real("first", &[])], &[], &|_| {}).await;
        assert!(
            again.failed.is_empty(),
            "read the state again: {:?}",
            again.failed
        );
        let other = publisher.push(vec![real("other", &[])], &[], &|_| {}).await;
        assert!(
            other
                .failed
                .iter()
                .any(|(_, e)| error_chain(&**e).contains("state.json")),
            "{:?}",
            other.failed
        );
    }

    /// A push cancelled while it has a path in hand releases it: a push waiting for that path
    /// learns it was abandoned, and a later push takes it in hand and publishes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancelled_push_abandons_its_paths_to_the_next() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let cache = file_cache(dir.path()).await;
        let source = Arc::new(Source::default());
        let (go, hold) = std::sync::mpsc::channel();
        *source.hold.lock().unwrap() = Some(hold);
        let publisher = cache.publisher(source.clone(), &opts(dir.path(), 4));
        let p1 = publisher.clone();
        let first =
            tokio::spawn(async move { p1.push(vec![real("held", &[])], &[], &|_| {}).await });
        while source.reads.load(SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        let p2 = publisher.clone();
        let (planned_tx, mut planned) = tokio::sync::mpsc::unbounded_channel();
        let waiting = tokio::spawn(async move {
            let on_event = move |e: Event| {
                if matches!(e, Event::Planned { .. }) {
                    let _ = planned_tx.send(());
                }
            };
            p2.push(vec![real("held", &[])], &[], &on_event).await
        });
        // Planned, with nothing of its own to upload: it waits for the first push's result.
        planned.recv().await.unwrap();
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        let waited = waiting.await.unwrap();
        assert!(
            matches!(&*waited.failed[0].1, CacheError::Abandoned { .. }),
            "{:?}",
            waited.failed
        );
        drop(go);
        *source.hold.lock().unwrap() = None;
        let again = publisher.push(vec![real("held", &[])], &[], &|_| {}).await;
        assert_eq!(
            again.uploaded,
            vec![store_path("held")],
            "{:?}",
            again.failed
        );
    }

    /// The cache loses a path the publisher remembers: the next push that asks about it (its item
    /// built it again) finds it gone, forgets everything it remembered, and publishes nothing over
    /// references it has not checked again; with the closure walked anew, all goes up. A reference
    /// outside the closure that was never known fails its dependent the same way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn references_not_known_any_more_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = file_cache(dir.path()).await;
        let publisher = cache.publisher(Arc::new(Source::default()), &opts(dir.path(), 4));
        let (base, mid) = (|| real("base", &[]), || real("mid", &["base"]));
        let first = publisher.push(vec![base(), mid()], &[], &|_| {}).await;
        assert_eq!(first.uploaded.len(), 2, "{:?}", first.failed);
        let narinfo = |p: &str| dir.path().join("cache").join(narinfo_key(&store_path(p)));
        std::fs::remove_file(narinfo("mid")).unwrap();

        // The daemon's walk stops at `base`, remembered: the closure is `mid` alone.
        let again = publisher
            .push(vec![mid()], &[store_path("mid")], &|_| {})
            .await;
        assert!(again.uploaded.is_empty());
        assert!(
            matches!(&*again.failed[0].1, CacheError::ReferenceForgotten { reference, .. } if *reference == store_path("base")),
            "{:?}",
            again.failed
        );
        assert!(
            !publisher.is_known(&store_path("base")),
            "the memory was kept"
        );
        assert!(!narinfo("mid").exists());

        let walked = publisher
            .push(vec![base(), mid()], &[store_path("mid")], &|_| {})
            .await;
        assert_eq!(
            walked.uploaded,
            vec![store_path("mid")],
            "{:?}",
            walked.failed
        );
        assert_eq!(walked.present, vec![store_path("base")]);

        let never = publisher
            .push(vec![real("top", &["never-seen"])], &[], &|_| {})
            .await;
        assert!(
            matches!(&*never.failed[0].1, CacheError::ReferenceForgotten { .. }),
            "{:?}",
            never.failed
        );
        assert!(!narinfo("top").exists());
    }

    #[test]
    fn remembered_paths_are_bounded_and_forgotten_oldest_first_or_in_time() {
        let mut r = Remembered::new(3, Duration::from_secs(3600));
        for name in ["a", "b", "c", "a", "d"] {
            r.insert(&store_path(name));
        }
        assert!(!r.contains(&store_path("a")));
        for name in ["b", "c", "d"] {
            assert!(r.contains(&store_path(name)), "{name}");
        }
        assert_eq!(r.order.len(), 3);
        let mut expired = Remembered::new(3, Duration::ZERO);
        expired.insert(&store_path("a"));
        assert!(
            !expired.contains(&store_path("a")),
            "remembered past its time"
        );
    }

    #[test]
    fn references_come_first_and_cycles_are_set_apart() {
        let tag = |v: Vec<PathInfo>| v.into_iter().map(|i| (i, ())).collect::<Vec<_>>();
        let (order, cyclic) = dependencies_first(tag(vec![
            info("top", &["left", "right", "top"]),
            info("left", &["bottom"]),
            info("right", &["bottom"]),
            info("bottom", &["bottom"]),
        ]));
        let names: Vec<&str> = order.iter().map(|(i, _)| i.path.name()).collect();
        assert_eq!(names.first(), Some(&"bottom"));
        assert_eq!(names.last(), Some(&"top"));
        assert!(cyclic.is_empty());
        let (order, cyclic) = dependencies_first(tag(vec![
            info("aa", &["bb"]),
            info("bb", &["aa"]),
            info("c", &[]),
        ]));
        assert_eq!(order.len(), 1);
        assert_eq!(cyclic.len(), 2);
    }
}
