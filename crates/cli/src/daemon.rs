//! `nixpush daemon`: drains the durable queue into the cache, in the background.
//!
//! - One daemon per state directory (an exclusive lock on `daemon.lock`).
//! - On start: in-flight items left by a crash are queued again, leftover spool files are removed,
//!   and multipart uploads a crash left behind are aborted (from the journal in `multipart/`).
//! - The hook's socket: each request is committed to the queue before it is acknowledged.
//! - The worker waits for a burst of hook requests to pause, claims due items in batches, resolves
//!   derivations to outputs, pushes the closures (see `nixpush_cache::Cache::push`), and completes
//!   every claimed item: done, gone (no longer in the store), queued again after a backoff, or
//!   failed (permanent error, or retrying too long).
//! - SIGTERM/SIGINT: stop accepting, finish the batch in hand, exit 0. The hook meanwhile writes the
//!   queue directly, so nothing built while the daemon is down is missed.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nixpush_cache::{Cache, CacheError, Event, NarSource, PushOptions, StoreUrl, error_chain};
use nixpush_format::{SecretKey, StorePath};
use nixpush_queue::{Claimed, Decision, Kind, Outcome, Queue, RetryPolicy};
use nixpush_store::{GcRoots, Store, StoreAddress, StoreError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, watch};

use crate::config::{self, Config};
use crate::ipc::{MAX_REQUEST, Reply, Request, WireKind};
use crate::push::{DEFAULT_JOBS, StoreSource, load_keys};

/// Items claimed at once: one closure computation and one push for all of them.
const BATCH: usize = 1000;
/// Recording a batch's outcomes that failed is tried again after this, doubling up to the maximum.
const RECORD_RETRY_MIN: Duration = Duration::from_secs(1);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(60);
/// GC roots are made to match the queue at start and this often (see [`Worker::sweep_roots`]).
const ROOTS_SWEEP: Duration = Duration::from_secs(300);
/// Roots younger than this are never swept away: the hook makes them just before it records the
/// item, so the queue may not show it yet.
const ROOTS_GRACE: Duration = Duration::from_secs(60);
/// Hooks that cannot reach the daemon write the queue directly; look for such work this often.
const POLL: Duration = Duration::from_secs(1);
/// After a hook's request, more builds usually follow: wait until hooks pause this long (or
/// [`GATHER_MAX`] passes) and upload them as one batch. One batch shares its closure walk, cache
/// probes and queue transactions, and does not compete with each build for the CPU, which on a
/// small builder slows the build loop itself.
const GATHER_QUIET: Duration = Duration::from_millis(100);
const GATHER_MAX: Duration = Duration::from_secs(1);

/// Upload queued builds in the background (what nixpush-hook feeds)
#[derive(clap::Args)]
pub struct Args {
    /// Binary cache URL (overrides `to` in the config file)
    #[arg(long, value_name = "STORE_URL")]
    to: Option<String>,
    /// Sign with this secret key (repeatable; adds to the config's secret-key-files)
    #[arg(long = "secret-key-file", value_name = "FILE")]
    secret_key_files: Vec<PathBuf>,
    /// Queue and lock directory (overrides `state-dir`)
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Socket the hook talks to (overrides `socket`)
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Paths prepared and uploaded at once (overrides `jobs`)
    #[arg(long, short = 'j', value_name = "N", value_parser = crate::config::parse_jobs)]
    jobs: Option<usize>,
    /// The local store: `daemon`, `unix://SOCKET`, `local` or `auto` [default: $NIX_REMOTE, else auto]
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Print the commented example configuration and exit
    #[arg(long)]
    print_config_example: bool,
}

struct Settings {
    url: StoreUrl,
    keys: Vec<SecretKey>,
    state_dir: PathBuf,
    socket: PathBuf,
    socket_group: Option<String>,
    jobs: usize,
    skip_signed_by: Vec<String>,
    retry: RetryPolicy,
    store: Option<String>,
    roots: Option<GcRoots>,
    roots_max: usize,
    spill_dir: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    if args.print_config_example {
        print!("{}", config::EXAMPLE);
        return Ok(());
    }
    let cfg = Config::load()?;
    let to = args.to.or(cfg.to.clone()).context(
        "no cache to upload to: set `to` in the config file (NIXPUSH_CONFIG, default /etc/nixpush/nixpush.toml) or pass --to",
    )?;
    let url: StoreUrl = to.parse()?;
    let mut key_files = cfg.secret_key_files.clone();
    key_files.extend(url.secret_key_files.iter().cloned());
    key_files.extend(args.secret_key_files);
    let settings = Settings {
        keys: load_keys(&key_files)?,
        url,
        state_dir: args.state_dir.unwrap_or_else(|| cfg.state_dir()),
        socket: args.socket.unwrap_or_else(|| cfg.socket()),
        socket_group: cfg.socket_group.clone(),
        jobs: args.jobs.or(cfg.jobs).unwrap_or(DEFAULT_JOBS),
        skip_signed_by: cfg.skip_signed_by.clone(),
        retry: cfg.retry_policy(),
        store: args.store,
        roots: cfg.gc_roots(),
        roots_max: cfg.gc_roots_max(),
        spill_dir: cfg.spill_dir(),
    };
    fs::create_dir_all(&settings.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            settings.state_dir.display()
        )
    })?;
    let _lock = lock(&settings.state_dir)?;
    let mut queue = Queue::open(&settings.state_dir)?;
    let recovered = queue.recover()?;
    let spool = settings.state_dir.join("spool");
    // Spool files of a killed daemon; their paths are queued again and will be spooled anew.
    let _ = fs::remove_dir_all(&spool);
    fs::create_dir_all(&spool).with_context(|| format!("cannot create {}", spool.display()))?;
    tracing::info!(
        state_dir = %settings.state_dir.display(),
        cache = %settings.url.display_base(),
        recovered,
        "nixpush daemon starting"
    );
    if settings.keys.is_empty() {
        tracing::warn!(
            "no signing key: paths are published with only the signatures the store already has"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(settings, queue))
}

/// Holds the state directory's lock for the daemon's lifetime.
fn lock(state_dir: &Path) -> Result<File> {
    let path = state_dir.join("daemon.lock");
    let f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another nixpush daemon is running for {} (lock {} is held)",
            state_dir.display(),
            path.display()
        );
    }
    Ok(f)
}

/// Who may queue paths through the socket: root (the hook runs as root under nix-daemon), the
/// daemon's own user, and members of `socket-group`. The socket's mode already keeps others out;
/// this holds even if the mode is loosened.
#[derive(Clone, Copy)]
struct Peers {
    own_uid: u32,
    group: Option<u32>,
}

impl Peers {
    fn allow(&self, cred: &tokio::net::unix::UCred) -> bool {
        if cred.uid() == 0 || cred.uid() == self.own_uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        if cred.gid() == group {
            return true;
        }
        // Supplementary groups: the peer process's own list, as the kernel has it.
        cred.pid()
            .and_then(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .is_some_and(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Groups:"))
                    .is_some_and(|g| g.split_whitespace().any(|g| g.parse() == Ok(group)))
            })
    }
}

fn bind(socket: &Path, group: Option<&str>) -> Result<(UnixListener, Peers)> {
    if let Some(dir) = socket.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("something is already listening on {}", socket.display());
        }
        fs::remove_file(socket)
            .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
    }
    // Created owner-only from the start: no moment where another user could connect.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(socket);
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("cannot listen on {}", socket.display()))?;
    let mut peers = Peers {
        // SAFETY: geteuid cannot fail and touches no memory.
        own_uid: unsafe { libc::geteuid() },
        group: None,
    };
    if let Some(group) = group {
        let name = std::ffi::CString::new(group).context("bad socket-group")?;
        // SAFETY: getgrnam reads a NUL-terminated string and returns a pointer into static storage,
        // read at once.
        let gr = unsafe { libc::getgrnam(name.as_ptr()) };
        if gr.is_null() {
            bail!("socket-group `{group}` does not exist");
        }
        let gid = unsafe { (*gr).gr_gid };
        peers.group = Some(gid);
        std::os::unix::fs::chown(socket, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", socket.display()))?;
        fs::set_permissions(socket, fs::Permissions::from_mode(0o660))?;
    }
    Ok((listener, peers))
}

async fn serve(settings: Settings, queue: Queue) -> Result<()> {
    let (listener, peers) = bind(&settings.socket, settings.socket_group.as_deref())?;
    // Hook requests and the worker share one connection. With two, a hook's commit that met the
    // worker's write lock waited in SQLite's busy handler, which sleeps in steps of milliseconds;
    // the mutex hands over as soon as the worker's transaction ends.
    let queue = Arc::new(Mutex::new(queue));
    let intake = queue.clone();
    let work = Arc::new(Notify::new());
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => return,
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("stopping: finishing the work in hand");
        let _ = stop_tx.send(true);
    });
    let acceptor = {
        let (work, mut stop) = (work.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((conn, _)) => {
                            let (intake, work) = (intake.clone(), work.clone());
                            tokio::spawn(async move { handle_hook(conn, peers, intake, work).await });
                        }
                        Err(e) => tracing::warn!(error = %e, "accept failed"),
                    },
                    _ = stop.changed() => break,
                }
            }
        })
    };
    let mut worker = Worker {
        settings,
        queue,
        store: None,
        cache: None,
    };
    worker.run(work, stop).await;
    let _ = acceptor.await;
    let _ = fs::remove_file(&worker.settings.socket);
    tracing::info!("stopped");
    Ok(())
}

/// One hook request: read, validate, commit, then acknowledge.
async fn handle_hook(conn: UnixStream, peers: Peers, intake: Arc<Mutex<Queue>>, work: Arc<Notify>) {
    // Who is asking, decided before the request is read, answered after (a reply to an unread
    // request would meet a closed pipe).
    let refused = match conn.peer_cred() {
        Ok(cred) if peers.allow(&cred) => None,
        Ok(cred) => Some(format!("uid {} gid {}", cred.uid(), cred.gid())),
        Err(e) => Some(format!("unknown peer ({e})")),
    };
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    let read_request = BufReader::new(read.take(MAX_REQUEST as u64))
        .read_line(&mut line)
        .await;
    let reply = match read_request {
        _ if refused.is_some() => {
            let who = refused.unwrap_or_default();
            tracing::warn!(peer = %who, "refused a request on the hook socket: not root, this user or socket-group");
            Reply::Error {
                error: format!("refused: {who} is not root, the daemon's user or in socket-group"),
            }
        }
        Err(e) => Reply::Error {
            error: format!("reading the request: {e}"),
        },
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error {
                error: format!("bad request: {e}"),
            },
            Ok(req) => {
                // The hook validated these already; the socket is still an input, so check again.
                let items: Vec<_> = req
                    .items
                    .iter()
                    .filter(|i| {
                        i.name
                            .parse::<StorePath>()
                            .is_ok_and(|p| i.kind == WireKind::Path || p.is_derivation())
                    })
                    .map(|i| i.to_item())
                    .collect();
                let committed = tokio::task::spawn_blocking(move || {
                    intake
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue(&items)
                })
                .await;
                match committed {
                    Ok(Ok(n)) => {
                        work.notify_one();
                        Reply::Queued { queued: n }
                    }
                    Ok(Err(e)) => Reply::Error {
                        error: format!("{:#}", anyhow::Error::from(e)),
                    },
                    Err(e) => Reply::Error {
                        error: e.to_string(),
                    },
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

/// Waits for hook requests to pause; see [`GATHER_QUIET`].
async fn gather(work: &Notify, stop: &mut watch::Receiver<bool>) {
    let deadline = tokio::time::Instant::now() + GATHER_MAX;
    loop {
        tokio::select! {
            _ = work.notified() => {}
            _ = tokio::time::sleep(GATHER_QUIET) => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = stop.changed() => return,
        }
    }
}

struct Worker {
    settings: Settings,
    queue: Arc<Mutex<Queue>>,
    store: Option<Arc<Store>>,
    cache: Option<Arc<Cache>>,
}

/// Why an attempt on an item failed, as the retry decision needs it.
#[derive(Clone)]
struct Failure {
    message: String,
    permanent: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn transient(message: String) -> Self {
        Failure {
            message,
            permanent: false,
            retry_after: None,
        }
    }
}

impl Worker {
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

    async fn run(&mut self, work: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let mut swept = None::<Instant>;
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
                self.release(&batch.0, &batch.1).await;
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
            nixpush_queue::spill::import(&dir, &mut q.lock().unwrap_or_else(|e| e.into_inner()))
        })
        .await;
        match imported {
            Ok(Ok(n)) => {
                if n > 0 {
                    tracing::info!(items = n, dir = %self.settings.spill_dir.display(), "queued items the hook had to spill");
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
        let dir = roots.dir().to_owned();
        let released = tokio::task::spawn_blocking(move || {
            let roots = GcRoots::new(dir);
            finished.iter().try_for_each(|item| roots.release(item))
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
        let swept =
            tokio::task::spawn_blocking(move || sweep(&GcRoots::new(dir), &pending, max)).await;
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
        let cache =
            Arc::new(Cache::open_with_journal(self.settings.url.clone(), Some(&journal)).await?);
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
            matches!(
                r,
                Err(StoreError::Io(_) | StoreError::Connect { .. } | StoreError::Protocol(_))
            )
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
            .map(|(c, r)| match r {
                Err(e @ (StoreError::NotValid(_) | StoreError::OutputNotBuilt { .. })) => {
                    tracing::info!(item = %c.item.name, "gone from the store; nothing to upload");
                    Outcome::Gone(error_chain(e))
                }
                Err(e) => self.retry(c, Failure::transient(error_chain(e))),
                Ok(roots) => {
                    if let Some(f) = &batch_error {
                        return self.retry(c, f.clone());
                    }
                    match roots.iter().find(|p| !ok.contains(p)) {
                        None => Outcome::Done,
                        Some(p) => match failed.get(p) {
                            Some(_) => self.retry(c, root_cause(p, failed)),
                            None => {
                                self.retry(c, Failure::transient(format!("{p} was not published")))
                            }
                        },
                    }
                }
            })
            .collect()
    }

    fn all_retry(&self, claimed: &[Claimed], f: Failure) -> Vec<Outcome> {
        tracing::warn!(error = %f.message, "batch failed; will retry");
        claimed.iter().map(|c| self.retry(c, f.clone())).collect()
    }

    fn retry(&self, c: &Claimed, f: Failure) -> Outcome {
        if f.permanent {
            return Outcome::Failed(f.message);
        }
        let since = c.retry_waited;
        let unit = getrandom::u64().map_or(0.5, |r| (r >> 11) as f64 / (1u64 << 53) as f64);
        match self
            .settings
            .retry
            .decide(c.attempts + 1, since, f.retry_after, unit)
        {
            Decision::RetryIn(ms) => Outcome::RetryIn {
                wait: Duration::from_millis(ms),
                error: f.message,
            },
            Decision::GiveUp => Outcome::Failed(format!(
                "gave up after {} attempts and {} of waits: {}",
                c.attempts + 1,
                crate::status::human_duration(since),
                f.message
            )),
        }
    }
}

/// See [`Worker::sweep_roots`]. Returns (items rooted, items released, pending items left
/// unprotected by the cap).
fn sweep(
    roots: &GcRoots,
    pending: &[nixpush_queue::Item],
    max: usize,
) -> std::io::Result<(usize, usize, usize)> {
    let keep: HashSet<&str> = pending.iter().take(max).map(|i| i.name.as_str()).collect();
    let rooted: HashSet<String> = roots.items()?.into_iter().collect();
    let mut removed = 0;
    for item in rooted.iter().filter(|r| !keep.contains(r.as_str())) {
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

fn failure_of(e: &CacheError) -> Failure {
    Failure {
        message: error_chain(e),
        // A corrupt store path stays corrupt; everything else (network, server, credentials being
        // fixed, a reference that failed for such a reason) may pass.
        permanent: matches!(e, CacheError::NarMismatch { .. }),
        retry_after: match e {
            CacheError::Throttled { retry_after, .. } => retry_after.map(Duration::from_secs),
            _ => None,
        },
    }
}

/// Follows "its reference … could not be published" to the path that actually failed.
fn root_cause(path: &StorePath, failed: &HashMap<StorePath, CacheError>) -> Failure {
    let mut cur = path;
    for _ in 0..failed.len() + 1 {
        match failed.get(cur) {
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
