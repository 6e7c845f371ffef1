//! `nixpush daemon`: reads the configuration and flags, takes the state directory's lock, recovers
//! what a crash left, and runs [`nixpush_drain::serve`], which does the work.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nixpush_cache::StoreUrl;
use nixpush_queue::Queue;

use crate::config::{self, Config};
use crate::push::{DEFAULT_JOBS, load_keys};

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
    /// Large NARs (over 1 MiB) compressed and uploaded at once (overrides `jobs`)
    #[arg(long, short = 'j', value_name = "N", value_parser = crate::config::parse_jobs)]
    jobs: Option<usize>,
    /// The local store: `daemon`, `unix://SOCKET`, `local` or `auto` [default: $NIX_REMOTE, else auto]
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Print the commented example configuration and exit
    #[arg(long)]
    print_config_example: bool,
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
    let settings = nixpush_drain::Settings {
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
        build_logs: cfg
            .upload_logs
            .unwrap_or(true)
            .then(nixpush_store::BuildLogs::system),
        spill_dir: cfg.spill_dir(),
        metrics_textfile: cfg.metrics_textfile.clone(),
        metrics_listen: cfg.metrics_listen.clone(),
        stop_timeout: cfg.stop_timeout(),
        keep_finished: cfg.keep_finished(),
        gather: cfg.gather(),
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
    // Builds wait for their hook, and the hook for the intake's answer: the intake keeps the
    // priority the daemon started with, on a thread started before the rest yields to builds.
    let intake = IntakeThread::start()?;
    if cfg.yield_to_builds.unwrap_or(true) {
        yield_to_builds();
    }
    let runtime = crate::push::upload_runtime()?;
    let served = runtime.block_on(nixpush_drain::serve(
        settings,
        queue,
        intake.runtime.clone(),
    ));
    // Attempts cut off at the stop may still hold blocking threads (a long compression): waiting
    // for them would overrun stop-timeout; what they would have done is queued again.
    runtime.shutdown_background();
    served
}

/// The name of the intake's thread and of its blocking threads (the queue's transactions).
const INTAKE_THREAD: &str = "nixpush-intake";

/// A one-thread runtime on a thread of its own, running what is spawned on `runtime` until dropped.
struct IntakeThread {
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IntakeThread {
    fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .thread_name(INTAKE_THREAD)
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(INTAKE_THREAD.into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
                // As for the main runtime: a queue write cut off is the hook's to retry.
                runtime.shutdown_background();
            })
            .context("cannot start the intake's thread")?;
        Ok(IntakeThread {
            runtime: handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for IntakeThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Lowers the daemon's CPU priority (nice 10) and I/O priority (best effort, lowest level), so that
/// compressing and hashing uploads yields to the builds running beside it. Done before the runtime
/// starts: Linux keeps both per thread, and threads inherit them from the one that creates them.
fn yield_to_builds() {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_BE: libc::c_int = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
    // SAFETY: both calls change only this thread's scheduling attributes.
    let (cpu, io) = unsafe {
        (
            libc::setpriority(libc::PRIO_PROCESS, 0, NICE),
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0,
                (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7,
            ),
        )
    };
    if cpu != 0 || io != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot lower the daemon's priority");
    }
}

/// The daemon's nice value when it yields to builds.
const NICE: libc::c_int = 10;

/// Holds the state directory's lock for the daemon's lifetime.
fn lock(state_dir: &Path) -> Result<File> {
    let path = state_dir.join("daemon.lock");
    let f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    if f.try_lock().is_err() {
        bail!(
            "another nixpush daemon is running for {} (lock {} is held)",
            state_dir.display(),
            path.display()
        );
    }
    Ok(f)
}
