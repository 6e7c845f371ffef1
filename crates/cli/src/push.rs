//! `nixpush push`: upload closures now, in the foreground.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use nixpush_cache::{Cache, NarSource, PushOptions, StoreUrl};
use nixpush_drain::StoreSource;
use nixpush_format::{SecretKey, StorePath};
use nixpush_store::{Store, StoreAddress};
use serde_json::json;

use crate::exit::PartialFailure;
use crate::paths;
use crate::report::{Progress, Reporter};

/// Upload the closures of store paths to a binary cache, now
#[derive(clap::Args)]
pub struct Args {
    /// Binary cache URL in Nix's syntax: s3://BUCKET?region=…&endpoint=…&compression=… or file:///DIR
    #[arg(long, value_name = "STORE_URL")]
    to: String,
    /// Store paths, symlinks into the store (./result), or .drv files (their outputs are pushed)
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<String>,
    /// Sign narinfos with this secret key (repeatable; adds to the URL's secret-key=)
    #[arg(long = "secret-key-file", value_name = "FILE")]
    secret_key_files: Vec<PathBuf>,
    /// Large NARs (over 1 MiB) compressed and uploaded at once; smaller ones go up to 256 at once
    /// [default: 16]
    #[arg(long, short = 'j', value_name = "N", value_parser = crate::config::parse_jobs)]
    jobs: Option<usize>,
    /// Do not upload paths signed by this key, e.g. cache.nixos.org-1 (repeatable)
    #[arg(long, value_name = "KEYNAME")]
    skip_signed_by: Vec<String>,
    /// The local store: `daemon`, `unix://SOCKET`, `local` or `auto` [default: $NIX_REMOTE, else auto]
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Where compressed NARs wait for upload [default: STATE_DIR/push if writable, else
    /// /var/tmp/nixpush-push-UID; never $TMPDIR, often a RAM disk]
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Print a JSON summary on stdout
    #[arg(long)]
    json: bool,
}

/// One push's private directory under the spool root: `spool/` for NARs, `multipart/` for the
/// journal of multipart uploads in progress, and `target` naming the cache. Removed when the push
/// ends, however it ends short of SIGKILL; a later push to the same cache aborts the uploads a
/// killed one left behind.
struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    /// The spool root: `--spool-dir`, else the state directory's `push/` when this user owns the
    /// state directory (root, usually), else `/var/tmp/nixpush-push-UID`: on disk, where `$TMPDIR`
    /// is often a RAM disk that a large NAR would fill. A default root must be a real directory of
    /// this user's, mode 0700, in a directory nobody else can rename it in: another user's
    /// directory or a planted symlink would let that user read the spool, plant journal entries
    /// (aborting our uploads), or redirect our writes.
    fn root(explicit: Option<PathBuf>) -> Result<PathBuf> {
        if let Some(d) = explicit {
            return Ok(d);
        }
        let state = crate::config::Config::load()
            .unwrap_or_default()
            .state_dir();
        if owned(&state) && private_dir(&state.join("push")) {
            return Ok(state.join("push"));
        }
        // SAFETY: geteuid cannot fail and touches no memory.
        let tmp = PathBuf::from(format!("/var/tmp/nixpush-push-{}", unsafe {
            libc::geteuid()
        }));
        if private_dir(&tmp) {
            return Ok(tmp);
        }
        anyhow::bail!(
            "{} is not a private directory of this user's (mode 0700, not a symlink): remove it, or pass --spool-dir",
            tmp.display()
        )
    }

    fn create(root: &std::path::Path, target: &str) -> Result<RunDir> {
        // The process id first (for `abandoned`), then the time: a recycled pid never reuses a
        // killed push's directory.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir = root.join(format!("{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(root)
            .and_then(|()| std::fs::create_dir(&dir))
            .and_then(|()| std::fs::create_dir(dir.join("spool")))
            .and_then(|()| std::fs::create_dir(dir.join("multipart")))
            .and_then(|()| std::fs::write(dir.join("target"), target))
            .with_context(|| format!("cannot create the spool directory {}", dir.display()))?;
        Ok(RunDir { dir })
    }

    fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    fn journal(&self) -> PathBuf {
        self.dir.join("multipart")
    }

    /// The directories of pushes to `target` that are no longer running.
    fn abandoned(root: &std::path::Path, target: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let pid: i32 = e.file_name().to_str()?.split('-').next()?.parse().ok()?;
                // SAFETY: signal 0 only asks whether the process exists.
                let alive = unsafe { libc::kill(pid, 0) } == 0
                    || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
                let same = std::fs::read_to_string(e.path().join("target")).ok()? == target;
                (pid != std::process::id() as i32 && !alive && same).then(|| e.path())
            })
            .collect()
    }
}

/// Whether `dir` is a directory (not a symlink) owned by this user.
fn owned(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail and touches no memory.
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == unsafe { libc::geteuid() })
}

/// Makes `dir` (mode 0700) if missing; whether it is then a private directory of this user's.
fn private_dir(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let _ = std::fs::DirBuilder::new().mode(0o700).create(dir);
    owned(dir) && std::fs::symlink_metadata(dir).is_ok_and(|m| m.mode() & 0o077 == 0)
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Most paths are small and their time is round trips to the cache, not CPU: many at once.
pub const DEFAULT_JOBS: usize = 16;

/// Reads secret key files; errors name the file and what is wrong, never the key.
pub fn load_keys(files: &[PathBuf]) -> Result<Vec<SecretKey>> {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read secret key file {}", f.display()))?;
            text.parse::<SecretKey>()
                .with_context(|| format!("secret key file {}", f.display()))
        })
        .collect()
}

/// Aborts the multipart uploads a killed push to the same cache journaled, then removes its
/// directory; on failure the directory stays for the next push to try again.
async fn clean_up_after(url: &StoreUrl, dead: &std::path::Path) {
    let cache = match Cache::open_with_journal(url.clone(), Some(&dead.join("multipart"))).await {
        Ok(c) => c,
        Err(_) => return,
    };
    match cache.abort_stale_uploads().await {
        Ok(n) => {
            if n > 0 {
                eprintln!(
                    "aborted {n} multipart uploads left by an earlier push that was killed ({})",
                    dead.display()
                );
            }
            let _ = std::fs::remove_dir_all(dead);
        }
        Err(e) => eprintln!(
            "warning: cannot abort the multipart uploads of an earlier push ({}): {}",
            dead.display(),
            nixpush_cache::error_chain(&e)
        ),
    }
}

pub fn run(args: Args) -> Result<()> {
    let url: StoreUrl = args.to.parse()?;
    let mut key_files = url.secret_key_files.clone();
    key_files.extend(args.secret_key_files.iter().cloned());
    let keys = load_keys(&key_files)?;
    if keys.is_empty() {
        eprintln!(
            "warning: no signing key (--secret-key-file or secret-key=): paths are published with only \
             the signatures the store already has"
        );
    }
    let jobs = args.jobs.unwrap_or(DEFAULT_JOBS);
    let address = StoreAddress::resolve(args.store.as_deref())?;
    let store = Arc::new(Store::open(address).context("cannot open the Nix store")?);
    let mut roots = Vec::new();
    for arg in &args.paths {
        roots.extend(paths::resolve(arg, &store)?);
    }
    let started = Instant::now();
    let runtime = upload_runtime()?;
    let target = url.display_base();
    let root = RunDir::root(args.spool_dir)?;
    let run_dir = RunDir::create(&root, &target)?;
    let reporter = Reporter::new(Progress::detect(args.json), url.compression.as_str());
    let interrupted = runtime.block_on(async {
        for dead in RunDir::abandoned(&root, &target) {
            clean_up_after(&url, &dead).await;
        }
        // The closure walk (the local daemon) and opening the cache (round trips to it) at once.
        let walk = {
            let (store, roots) = (store.clone(), roots.clone());
            tokio::task::spawn_blocking(move || store.closure(&roots, jobs, |_| false))
        };
        let journal = run_dir.journal();
        let (closure, cache) = tokio::join!(walk, Cache::open_with_journal(url, Some(&journal)));
        let closure = closure
            .expect("the closure walk panicked")
            .context("cannot compute the closure")?;
        let cache = cache.with_context(|| format!("cannot open cache {target}"))?;
        let opts = PushOptions {
            jobs,
            keys,
            skip_signed_by: args.skip_signed_by,
            spool_dir: run_dir.spool(),
        };
        let source: Arc<dyn NarSource> = Arc::new(StoreSource(store));
        let on_event = |e| reporter.event(e);
        let push = cache.push(closure.into_values().collect(), source, &opts, &on_event);
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        );
        let signal = tokio::select! {
            summary = push => return anyhow::Ok(Ok(summary)),
            _ = int.recv() => ("SIGINT", 130),
            _ = term.recv() => ("SIGTERM", 143),
        };
        // The push is dropped, and its uploads with it; the ones in parts were journaled, and an
        // unfinished multipart upload is invisible but billed: abort them before leaving, within
        // a minute, and at once on a second signal (the journal then stays for the next push).
        let aborted: Result<usize, String> = tokio::select! {
            a = tokio::time::timeout(std::time::Duration::from_secs(60), cache.abort_stale_uploads()) => {
                match a {
                    Ok(Ok(n)) => Ok(n),
                    Ok(Err(e)) => Err(nixpush_cache::error_chain(&e)),
                    Err(_) => Err("aborting took more than 60 s".into()),
                }
            }
            _ = int.recv() => Err("interrupted again".into()),
            _ = term.recv() => Err("terminated again".into()),
        };
        anyhow::Ok(Err((signal, aborted)))
    })?;
    let summary = match interrupted {
        Ok(summary) => summary,
        Err(((name, code), aborted)) => {
            reporter.interrupted();
            match &aborted {
                Ok(n) => eprintln!(
                    "nixpush: interrupted by {name}: nothing half-written is visible; aborted {n} multipart uploads"
                ),
                Err(e) => eprintln!(
                    "nixpush: interrupted by {name}; could not abort its multipart uploads ({e}); the next push to {target} will"
                ),
            }
            // The run directory goes; the journal stays when aborting failed, for the next push.
            if aborted.is_ok() {
                drop(run_dir);
            } else {
                std::mem::forget(run_dir);
            }
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            std::process::exit(code);
        }
    };
    let elapsed = started.elapsed();
    reporter.finish(&target, &summary, elapsed);
    if args.json {
        let names = |v: &[StorePath]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let report = json!({
            "uploaded": names(&summary.uploaded),
            "already_present": names(&summary.present),
            "skipped": names(&summary.skipped),
            "failed": summary.failed.iter().map(|(p, e)| json!({"path": p.to_string(), "error": nixpush_cache::error_chain(e)})).collect::<Vec<_>>(),
            "nar_bytes": summary.nar_bytes,
            "compressed_bytes": summary.file_bytes,
            "seconds": elapsed.as_secs_f64(),
        });
        println!("{report}");
    }
    if !summary.failed.is_empty() {
        let total = summary.uploaded.len()
            + summary.present.len()
            + summary.skipped.len()
            + summary.failed.len();
        return Err(PartialFailure(format!(
            "{} of {total} paths were not published",
            summary.failed.len()
        ))
        .into());
    }
    Ok(())
}

/// The runtime that uploads run on. Its one thread only drives requests: reading NARs, compressing
/// and hashing them run on blocking threads, as many at once as the compression budget allows. On a
/// builder's few cores, worker threads handing requests to each other cost more than they gained: a
/// push of 1,000 small paths took a third more CPU with two workers than with one thread, and was
/// slower (bench/latency.sh).
pub(crate) fn upload_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
