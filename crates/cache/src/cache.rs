//! Publishing closures: skip what the cache has, upload NARs concurrently, and publish narinfos in
//! reference order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use nixpush_format::cache_keys::{
    CONTENT_TYPE_CACHE_INFO, CONTENT_TYPE_NAR, CONTENT_TYPE_NARINFO, NIX_CACHE_INFO, nar_key,
    narinfo_key,
};
use nixpush_format::store_path::STORE_DIR;
use nixpush_format::{NarInfo, PathInfo, SecretKey, StorePath};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::error_chain;
use crate::source::NarSource;
use crate::spool::{CompressOptions, PARALLEL_MIN_NAR, Spool, spool_nar};
use crate::target::{RequestObserver, Target};
use crate::{CacheError, StoreUrl};

/// What happened to each path, as it happens. The CLI turns these into log lines, a progress bar
/// and JSON; the daemon into queue updates.
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
    /// Paths whose NARs are prepared and uploaded at once.
    pub jobs: usize,
    pub keys: Vec<SecretKey>,
    pub skip_signed_by: Vec<String>,
    pub spool_dir: PathBuf,
}

#[derive(Debug, Default)]
pub struct PushSummary {
    pub uploaded: Vec<StorePath>,
    pub present: Vec<StorePath>,
    pub skipped: Vec<StorePath>,
    pub failed: Vec<(StorePath, CacheError)>,
    pub nar_bytes: u64,
    pub file_bytes: u64,
}

pub struct Cache {
    target: Arc<Target>,
    url: StoreUrl,
    /// Compression threads, shared by every job of every push through this cache (see
    /// [`compression_threads`]).
    threads: Arc<ThreadBudget>,
}

/// The compression threads, and how many compressions wait for one: a large NAR borrows extra
/// threads only when nobody waits, since one thread per NAR uses the cores fully with no
/// multi-threading overhead (xz's parallel encoder idles threads on each NAR's last block).
struct ThreadBudget {
    permits: Arc<Semaphore>,
    /// What one NAR may hold at most: half the budget, so a large xz NAR (minutes of work) never
    /// holds every thread while small paths queue behind it.
    most: usize,
    waiting: std::sync::atomic::AtomicUsize,
}

impl ThreadBudget {
    fn new(threads: usize) -> Self {
        ThreadBudget {
            permits: Arc::new(Semaphore::new(threads)),
            most: (threads / 2).max(1),
            waiting: Default::default(),
        }
    }

    /// One thread, then up to `want - 1` more that are free and wanted by nobody else.
    async fn acquire(&self, want: u32) -> tokio::sync::OwnedSemaphorePermit {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiting.fetch_add(1, SeqCst);
        let acquired = self.permits.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, SeqCst);
        let mut threads = acquired.expect("semaphore closed");
        let want = (want as usize).min(self.most);
        while threads.num_permits() < want && self.waiting.load(SeqCst) == 0 {
            match self.permits.clone().try_acquire_owned() {
                Ok(more) => threads.merge(more),
                Err(_) => break,
            }
        }
        threads
    }
}

/// How many compressors may run at once, in all: one per core (at least two). Each compression
/// holds one thread of this budget while it runs, and a large NAR borrows more that are free, so
/// threads and compressor memory are bounded by the machine, not by cores × jobs (16 jobs of xz at
/// 64 threads each were ~1,000 threads and tens of GiB).
pub fn compression_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2)
}

impl Cache {
    /// Connects (for S3: resolves credentials and checks the bucket) and writes `nix-cache-info` if
    /// the cache has none.
    pub async fn open(url: StoreUrl) -> Result<Self, CacheError> {
        Self::open_with_journal(url, None).await
    }

    /// Like [`Cache::open`], recording multipart uploads in `journal` (a directory) while they are in
    /// progress, so that [`Cache::abort_stale_uploads`] can clean up after a crash.
    pub async fn open_with_journal(
        url: StoreUrl,
        journal: Option<&std::path::Path>,
    ) -> Result<Self, CacheError> {
        Self::open_observed(url, journal, None).await
    }

    /// Like [`Cache::open_with_journal`], telling `observer` of every S3 request attempt.
    pub async fn open_observed(
        url: StoreUrl,
        journal: Option<&std::path::Path>,
        observer: Option<RequestObserver>,
    ) -> Result<Self, CacheError> {
        let target = Target::open(&url, journal, observer).await?;
        let cache = Cache {
            target: Arc::new(target),
            url,
            threads: Arc::new(ThreadBudget::new(compression_threads())),
        };
        cache.ensure_cache_info().await?;
        Ok(cache)
    }

    /// Compresses with at most `threads` threads in all, instead of [`compression_threads`].
    pub fn with_compression_threads(mut self, threads: usize) -> Self {
        self.threads = Arc::new(ThreadBudget::new(threads.max(1)));
        self
    }

    /// Aborts the multipart uploads this process's journal recorded and did not finish.
    pub async fn abort_stale_uploads(&self) -> Result<usize, CacheError> {
        self.target.abort_journaled().await
    }

    async fn ensure_cache_info(&self) -> Result<(), CacheError> {
        if let Some(existing) = self.target.get(NIX_CACHE_INFO).await? {
            let text = String::from_utf8_lossy(&existing);
            let store_dir = text.lines().find_map(|l| l.strip_prefix("StoreDir: "));
            return match store_dir {
                Some(d) if d != STORE_DIR => Err(CacheError::StoreDirMismatch {
                    found: d.to_owned(),
                    expected: STORE_DIR.to_owned(),
                }),
                _ => Ok(()),
            };
        }
        let info = format!(
            "StoreDir: {STORE_DIR}\nWantMassQuery: {}\nPriority: {}\n",
            u8::from(self.url.want_mass_query.unwrap_or(true)),
            self.url.priority.unwrap_or(40)
        );
        self.target
            .put_bytes(NIX_CACHE_INFO, info.into_bytes(), CONTENT_TYPE_CACHE_INFO)
            .await
    }

    /// The compressor's settings; `threads` is what a large NAR may use at most, as the budget
    /// allows when it starts.
    fn compress_options(&self) -> CompressOptions {
        let threads = if self.url.parallel_compression {
            compression_threads() as u32
        } else {
            1
        };
        CompressOptions {
            compression: self.url.compression,
            level: self.url.compression_level,
            threads,
        }
    }

    /// Publishes every path of `closure` (a closure: every reference of a member is a member, or
    /// already in the cache). Never fails as a whole: each path ends uploaded, present, skipped or
    /// failed with its reason.
    pub async fn push(
        &self,
        closure: Vec<PathInfo>,
        source: Arc<dyn NarSource>,
        opts: &PushOptions,
        on_event: &(dyn Fn(Event) + Send + Sync),
    ) -> PushSummary {
        let mut summary = PushSummary::default();
        let mut candidates = Vec::new();
        for info in closure {
            match info
                .sigs
                .iter()
                .find(|s| opts.skip_signed_by.iter().any(|k| k == s.key_name()))
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

        // Ask the cache what it has, many at once: on S3 each question is a round trip.
        let probes = Arc::new(Semaphore::new((opts.jobs * 4).max(SMALL_IN_FLIGHT)));
        let mut set = JoinSet::new();
        for info in candidates {
            let (target, probes) = (self.target.clone(), probes.clone());
            set.spawn(async move {
                let _permit = probes.acquire_owned().await;
                let has = target.exists(&narinfo_key(&info.path)).await;
                (info, has)
            });
        }
        let mut upload = Vec::new();
        let mut unavailable = HashSet::new();
        while let Some(joined) = set.join_next().await {
            match joined.expect("narinfo probe panicked") {
                (info, Ok(true)) => {
                    on_event(Event::AlreadyPresent {
                        path: info.path.clone(),
                    });
                    summary.present.push(info.path);
                }
                (info, Ok(false)) => upload.push(info),
                (info, Err(e)) => {
                    on_event(Event::Failed {
                        path: info.path.clone(),
                        error: error_chain(&e),
                    });
                    unavailable.insert(info.path.clone());
                    summary.failed.push((info.path, e));
                }
            }
        }
        tracing::debug!(
            missing = upload.len(),
            present = summary.present.len(),
            "cache probed"
        );
        let (upload, cyclic) = dependencies_first(upload);
        for info in cyclic {
            let reference = info
                .references
                .iter()
                .find(|r| **r != info.path)
                .cloned()
                .unwrap_or(info.path.clone());
            let e = CacheError::ReferenceFailed {
                path: info.path.clone(),
                reference,
            };
            on_event(Event::Failed {
                path: info.path.clone(),
                error: error_chain(&e),
            });
            unavailable.insert(info.path.clone());
            summary.failed.push((info.path, e));
        }
        on_event(Event::Planned {
            upload: upload.len(),
            present: summary.present.len(),
            skipped: summary.skipped.len(),
            nar_bytes: upload.iter().map(|i| i.nar_size).sum(),
        });

        let ctx = Arc::new(Ctx {
            target: self.target.clone(),
            source,
            compress: self.compress_options(),
            keys: opts.keys.clone(),
            spool_dir: opts.spool_dir.clone(),
            jobs: Semaphore::new(opts.jobs.max(1)),
            small: Semaphore::new(SMALL_IN_FLIGHT),
            threads: self.threads.clone(),
        });
        let mut done: HashMap<StorePath, watch::Receiver<Option<bool>>> = HashMap::new();
        let mut senders = Vec::new();
        for info in &upload {
            let (tx, rx) = watch::channel(None);
            done.insert(info.path.clone(), rx);
            senders.push(tx);
        }
        let mut tasks = JoinSet::new();
        for (info, tx) in upload.into_iter().zip(senders) {
            let deps = info
                .references
                .iter()
                .filter(|r| **r != info.path)
                .map(|r| match done.get(r) {
                    Some(rx) => Dep::Pending(r.clone(), rx.clone()),
                    None if unavailable.contains(r) => Dep::Failed(r.clone()),
                    None => Dep::Available,
                })
                .collect();
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let result = ctx.publish(&info, deps).await;
                // Dependents wait on this; a send error only means nobody depends on this path.
                let _ = tx.send(Some(result.is_ok()));
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
                        error: error_chain(&e),
                    });
                    summary.failed.push((info.path, e));
                }
            }
        }
        summary
    }
}

/// A NAR this small (uncompressed) is spooled in memory and sent in one request: its time is round
/// trips, so up to [`SMALL_IN_FLIGHT`] of them go at once, whatever `jobs` says. Memory stays
/// bounded: at most that many times this size.
const SMALL_NAR: u64 = crate::spool::MEMORY_SPOOL as u64;
const SMALL_IN_FLIGHT: usize = 64;

/// NARs at least this large (compressed) are only uploaded after asking whether the cache has them.
const ASK_BEFORE_PUT: u64 = 1 << 20;

enum Dep {
    /// Being published in this push: wait for it.
    Pending(StorePath, watch::Receiver<Option<bool>>),
    /// Could not even be checked: this path cannot be published either.
    Failed(StorePath),
    /// Already in the cache, or skipped because an upstream cache has it.
    Available,
}

impl Dep {
    fn known_failure(&self) -> Option<StorePath> {
        match self {
            Dep::Failed(r) => Some(r.clone()),
            Dep::Pending(r, rx) if *rx.borrow() == Some(false) => Some(r.clone()),
            _ => None,
        }
    }
}

struct Ctx {
    target: Arc<Target>,
    source: Arc<dyn NarSource>,
    compress: CompressOptions,
    keys: Vec<SecretKey>,
    spool_dir: PathBuf,
    jobs: Semaphore,
    /// Slots for small NARs, see [`SMALL_NAR`].
    small: Semaphore,
    threads: Arc<ThreadBudget>,
}

struct Published {
    file_size: u64,
    nar_existed: bool,
}

impl Ctx {
    async fn publish(
        self: &Arc<Self>,
        info: &PathInfo,
        deps: Vec<Dep>,
    ) -> Result<Published, CacheError> {
        // A reference that has already failed dooms this path: do not upload a NAR nobody can use.
        if let Some(reference) = deps.iter().find_map(Dep::known_failure) {
            return Err(CacheError::ReferenceFailed {
                path: info.path.clone(),
                reference,
            });
        }
        // The job slot covers the NAR only; waiting for references below must not hold one, or a
        // path could wait on a reference that waits for a slot.
        let (mut narinfo, published) = {
            // Small NARs (most of any closure) are latency, not bandwidth or CPU: a round trip
            // each, many at once, outside the `jobs` that bound large ones.
            let slots = if info.nar_size <= SMALL_NAR {
                &self.small
            } else {
                &self.jobs
            };
            let _slot = slots.acquire().await.expect("semaphore closed");
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
            let nar_existed = spooled.file_size >= ASK_BEFORE_PUT
                && self.target.size(&key).await? == Some(spooled.file_size);
            if !nar_existed {
                match spooled.spool {
                    Spool::Memory(bytes) => {
                        self.target.put_bytes(&key, bytes, CONTENT_TYPE_NAR).await?
                    }
                    Spool::File(ref f) => {
                        self.target
                            .put_file(
                                &key,
                                f.path(),
                                spooled.file_size,
                                spooled.file_hash,
                                CONTENT_TYPE_NAR,
                            )
                            .await?
                    }
                }
            }
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
            )
        };
        for dep in deps {
            match dep {
                Dep::Available => {}
                Dep::Failed(reference) => {
                    return Err(CacheError::ReferenceFailed {
                        path: info.path.clone(),
                        reference,
                    });
                }
                Dep::Pending(reference, mut rx) => {
                    let ok = rx
                        .wait_for(Option::is_some)
                        .await
                        .map(|v| *v == Some(true))
                        .unwrap_or(false);
                    if !ok {
                        return Err(CacheError::ReferenceFailed {
                            path: info.path.clone(),
                            reference,
                        });
                    }
                }
            }
        }
        for key in &self.keys {
            // NarSize was checked non-zero against the real NAR above, so signing cannot fail.
            narinfo.sign(key).map_err(|e| CacheError::Source {
                path: info.path.clone(),
                message: e.to_string(),
            })?;
        }
        let key = narinfo_key(&info.path);
        self.target
            .put_bytes(&key, narinfo.to_string().into_bytes(), CONTENT_TYPE_NARINFO)
            .await?;
        Ok(published)
    }
}

/// Orders paths so that each comes after the members it references (Kahn's algorithm). The
/// semaphore hands out job slots in this order, so narinfos can go up while later NARs upload.
fn dependencies_first(paths: Vec<PathInfo>) -> (Vec<PathInfo>, Vec<PathInfo>) {
    let index: HashMap<StorePath, usize> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.clone(), i))
        .collect();
    let mut waiting_on = vec![0usize; paths.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); paths.len()];
    for (i, p) in paths.iter().enumerate() {
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
    let mut slots: Vec<Option<PathInfo>> = paths.into_iter().map(Some).collect();
    let ordered = order.into_iter().filter_map(|i| slots[i].take()).collect();
    (ordered, slots.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixpush_format::Sha256;

    fn info(name: &str, refs: &[&str]) -> PathInfo {
        let p = |n: &str| StorePath::from_base_name(&format!("{:0>32}-{n}", n.len())).unwrap();
        PathInfo {
            path: p(name),
            deriver: None,
            nar_hash: Sha256([0; 32]),
            nar_size: 8,
            references: refs.iter().map(|r| p(r)).collect(),
            registration_time: 0,
            ultimate: false,
            sigs: vec![],
            ca: None,
        }
    }

    /// Counts how many NARs are being written (so compressed) at once.
    struct Concurrency {
        now: std::sync::atomic::AtomicUsize,
        max: std::sync::atomic::AtomicUsize,
    }

    impl NarSource for Concurrency {
        fn write_nar(
            &self,
            path: &StorePath,
            out: &mut dyn std::io::Write,
        ) -> Result<(), crate::SourceError> {
            use std::sync::atomic::Ordering::SeqCst;
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

    /// Regression: every job compressed with its own threads, so threads (and compressor memory)
    /// grew with cores × jobs. Compressions now share one budget of threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn compressions_share_one_thread_budget_whatever_the_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let url: StoreUrl = format!("file://{}/cache", dir.path().display())
            .parse()
            .unwrap();
        let cache = Cache::open(url).await.unwrap().with_compression_threads(3);
        let closure: Vec<PathInfo> = (0..48)
            .map(|i| {
                let name = format!("budget-{i}");
                let nar = nar_of(&name);
                PathInfo {
                    nar_hash: Sha256::digest(&nar),
                    nar_size: nar.len() as u64,
                    ..info(&name, &[])
                }
            })
            .collect();
        let source = Arc::new(Concurrency {
            now: Default::default(),
            max: Default::default(),
        });
        let opts = PushOptions {
            jobs: 32,
            keys: vec![],
            skip_signed_by: vec![],
            spool_dir: dir.path().to_owned(),
        };
        let summary = cache.push(closure, source.clone(), &opts, &|_| {}).await;
        assert_eq!(summary.uploaded.len(), 48, "{:?}", summary.failed);
        let max = source.max.load(std::sync::atomic::Ordering::SeqCst);
        assert!(max <= 3, "{max} compressions at once with a budget of 3");
        assert!(max >= 2, "the budget was never used in parallel");
    }

    #[test]
    fn references_come_first_and_cycles_are_set_apart() {
        let (order, cyclic) = dependencies_first(vec![
            info("top", &["left", "right", "top"]),
            info("left", &["bottom"]),
            info("right", &["bottom"]),
            info("bottom", &["bottom"]),
        ]);
        let names: Vec<&str> = order.iter().map(|i| i.path.name()).collect();
        assert_eq!(names.first(), Some(&"bottom"));
        assert_eq!(names.last(), Some(&"top"));
        assert!(cyclic.is_empty());
        let (order, cyclic) = dependencies_first(vec![
            info("aa", &["bb"]),
            info("bb", &["aa"]),
            info("c", &[]),
        ]);
        assert_eq!(order.len(), 1);
        assert_eq!(cyclic.len(), 2);
    }
}
