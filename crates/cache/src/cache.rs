//! The cache as a whole: opening it (credentials, bucket, `nix-cache-info`), cleaning up after
//! crashed uploads, and the compression threads every push through it shares; and reading it back
//! ([`CacheReader`]). Publishing is [`crate::publisher`]'s.

use std::sync::Arc;

use nixpush_format::cache_keys::{
    CONTENT_TYPE_CACHE_INFO, CONTENT_TYPE_LOG, NIX_CACHE_INFO, log_key, narinfo_key,
};
use nixpush_format::store_path::STORE_DIR;
use nixpush_format::{PathInfo, StorePath};
use tokio::sync::Semaphore;

use crate::publisher::{Event, Publisher, PushOptions, PushSummary};
use crate::source::NarSource;
use crate::spool::CompressOptions;
use crate::target::{RequestObserver, Target};
use crate::{CacheError, StoreUrl};

/// A cache read, never written: what `nixpush wait` asks before it reports success.
pub struct CacheReader {
    target: Target,
}

impl CacheReader {
    /// Connects (for S3: resolves credentials); a missing directory is an error.
    pub async fn open(url: &StoreUrl) -> Result<Self, CacheError> {
        Ok(CacheReader {
            target: Target::open_read(url).await?,
        })
    }

    /// Whether the cache has `path`'s narinfo (a HEAD request).
    pub async fn has(&self, path: &StorePath) -> Result<bool, CacheError> {
        self.target.exists(&narinfo_key(path)).await
    }
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
pub(crate) struct ThreadBudget {
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
    pub(crate) async fn acquire(&self, want: u32) -> tokio::sync::OwnedSemaphorePermit {
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
        let target = Target::open_unchecked(&url, journal, observer).await?;
        // The start-up check and the first read at once: a round trip less before any work. The
        // check's error is the one to report: it says why the read failed too.
        let (checked, existing) = tokio::join!(target.check(), target.get(NIX_CACHE_INFO));
        checked?;
        let cache = Cache {
            target: Arc::new(target),
            url,
            threads: Arc::new(ThreadBudget::new(compression_threads())),
        };
        cache.ensure_cache_info(existing?).await?;
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

    /// Checks the `nix-cache-info` the cache has (`existing`), or writes one.
    async fn ensure_cache_info(&self, existing: Option<Vec<u8>>) -> Result<(), CacheError> {
        if let Some(existing) = existing {
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

    /// A publisher for pushes through this cache, reading NARs from `source`.
    pub fn publisher(&self, source: Arc<dyn NarSource>, opts: &PushOptions) -> Publisher {
        Publisher::new(
            self.target.clone(),
            self.threads.clone(),
            self.compress_options(),
            source,
            opts,
        )
    }

    /// Uploads `text` as the build log of `drv` (see [`Publisher::put_log`]).
    pub async fn put_log(&self, drv: &StorePath, text: Vec<u8>) -> Result<(), CacheError> {
        self.target
            .put_bytes(&log_key(drv), text, CONTENT_TYPE_LOG)
            .await
    }

    /// Publishes every path of `closure` (see [`Publisher::push`]).
    pub async fn push(
        &self,
        closure: Vec<PathInfo>,
        source: Arc<dyn NarSource>,
        opts: &PushOptions,
        on_event: &(dyn Fn(Event) + Send + Sync),
    ) -> PushSummary {
        self.publisher(source, opts)
            .push(closure, &[], on_event)
            .await
    }
}
