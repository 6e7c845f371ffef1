//! `nixpush enqueue`: queues what no hook saw. The post-build hook runs only for paths built here;
//! paths substituted from another cache, fetched, added with `nix-store --add`, or already valid
//! reach the queue only this way.

use std::io::BufRead;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nixpush_cache::StoreUrl;
use nixpush_drain::ipc::{WireItem, WireKind};
use nixpush_queue::Queue;
use nixpush_store::{Store, StoreAddress};
use serde_json::json;

use crate::config::Config;
use crate::exit::PartialFailure;
use crate::record::{self, Recorded};
use crate::wait::{BARRIER_TIMEOUT, Follower, Mark, POLL, PROGRESS_EVERY, Standing};

/// Queue store paths no hook saw (substituted, fetched, added), or those registered since a mark
#[derive(clap::Args)]
pub struct EnqueueArgs {
    /// Store paths, or symlinks into the store (./result); a .drv stands for its outputs
    #[arg(value_name = "PATH")]
    paths: Vec<String>,
    /// Also read paths from stdin, one per line, each queued as it comes
    #[arg(long)]
    stdin: bool,
    /// Queue the store paths registered since this mark (from `nixpush mark`), leaving out
    /// derivations and paths signed by a `skip-signed-by` key
    #[arg(long, value_name = "MARK")]
    since: Option<Mark>,
    /// The local store, for --since: `daemon`, `unix://SOCKET`, `local` or `auto` [default:
    /// $NIX_REMOTE, else auto]
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Print one JSON line per path once its closure is published (or cannot be), and exit as
    /// `nixpush wait` does: 1 when something is not published by --timeout
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 3600.0,
        requires = "wait"
    )]
    timeout: f64,
}

/// Store listing connections for --since.
const LIST_CONNECTIONS: usize = 4;

pub fn enqueue(args: EnqueueArgs) -> Result<()> {
    if args.paths.is_empty() && !args.stdin && args.since.is_none() {
        bail!("nothing to enqueue: give store paths, --stdin or --since MARK");
    }
    if !args.timeout.is_finite() || args.timeout < 0.0 {
        bail!("--timeout {} is not a number of seconds", args.timeout);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let config = Config::load()?;
    let mut first = record::path_items(&args.paths)?;
    if let Some(mark) = args.since {
        first.extend(registered_since(&args, &config, mark)?);
    }
    let lines = args.stdin.then(read_stdin);
    if !args.wait {
        let mut queued = record_batch(&config, &first)?;
        if let Some(lines) = lines {
            for line in lines {
                queued += record_batch(&config, &record::path_items(&[line?])?)?;
            }
        }
        eprintln!("nixpush enqueue: queued {queued} path(s)");
        return Ok(());
    }
    let (url, runtime) = crate::wait::cache_to_check(&config)?;
    runtime.block_on(follow(&config, url, first, lines, deadline))
}

/// Records `items` (rooted first); returns how many.
fn record_batch(config: &Config, items: &[WireItem]) -> Result<usize> {
    if items.is_empty() {
        return Ok(0);
    }
    if let Some(roots) = config.gc_roots() {
        let problems = record::protect(&roots, items);
        if !problems.is_empty() {
            eprintln!(
                "nixpush enqueue: WARNING: {}",
                problems.trim_start_matches("; ")
            );
        }
    }
    match record::record(config, items, Duration::from_secs(5)) {
        Ok(Recorded::Daemon) => {}
        Ok(Recorded::Queue { daemon_error }) => eprintln!(
            "nixpush enqueue: the daemon did not answer ({daemon_error}); wrote the queue directly"
        ),
        Ok(Recorded::Spill { file, .. }) => eprintln!(
            "nixpush enqueue: WARNING: the queue is not writable; recorded in {} for the daemon",
            file.display()
        ),
        Err(e) => bail!("could not queue {} path(s): {e}", items.len()),
    }
    Ok(items.len())
}

/// Stdin's lines (empty ones skipped), read on a thread of their own so that the caller can go on
/// following what it queued while the producer is still writing.
fn read_stdin() -> mpsc::Receiver<Result<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin");
            let stop = line.is_err();
            if line.as_ref().is_ok_and(|l| l.trim().is_empty()) {
                continue;
            }
            if tx.send(line.map(|l| l.trim().to_owned())).is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// The store paths registered at or after the mark's second (the store keeps seconds), except
/// derivations (build recipes, not what a cache serves) and paths an upstream cache signs.
fn registered_since(args: &EnqueueArgs, config: &Config, mark: Mark) -> Result<Vec<WireItem>> {
    let address = StoreAddress::resolve(args.store.as_deref())?;
    let store = Store::open(address).context("cannot open the Nix store")?;
    let since = u64::try_from(mark.at_ms / 1000).unwrap_or(0);
    let infos = store
        .registered_since(since, LIST_CONNECTIONS)
        .context("cannot list the store's paths")?;
    let skip = &config.skip_signed_by;
    let mut items: Vec<WireItem> = infos
        .into_iter()
        .filter(|i| !i.path.is_derivation())
        .filter(|i| {
            !i.sigs
                .iter()
                .any(|s| skip.iter().any(|k| k == s.key_name()))
        })
        .map(|i| WireItem {
            name: i.path.to_string(),
            kind: WireKind::Path,
        })
        .collect();
    items.sort_by(|a, b| a.name.cmp(&b.name));
    eprintln!(
        "nixpush enqueue: {} path(s) registered since mark {mark}",
        items.len()
    );
    Ok(items)
}

/// `--wait`: records what comes, follows it to the cache, and prints one JSON line per path as it
/// settles; at the deadline, one for each path left, and exit 1.
async fn follow(
    config: &Config,
    url: StoreUrl,
    first: Vec<WireItem>,
    lines: Option<mpsc::Receiver<Result<String>>>,
    deadline: Instant,
) -> Result<()> {
    let state_dir = config.state_dir();
    let queue = Queue::open(&state_dir)
        .with_context(|| format!("cannot open the queue in {}", state_dir.display()))?;
    let mut follower = Follower::new(config.clone(), url, queue);
    let add = |follower: &mut Follower, items: Vec<WireItem>| -> Result<()> {
        record_batch(config, &items)?;
        follower.add(items.iter().map(WireItem::to_item));
        Ok(())
    };
    add(&mut follower, first)?;
    // As `wait` does: items backing off are tried now, and a daemon that is not there is known.
    let mut daemon_seen = crate::wait::barrier(config, None, BARRIER_TIMEOUT)
        .await
        .is_ok();
    let mut next_barrier = Instant::now() + Duration::from_secs(5);
    let mut open = lines.is_some();
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    loop {
        if let Some(lines) = &lines {
            loop {
                match lines.try_recv() {
                    Ok(line) => add(&mut follower, record::path_items(&[line?])?)?,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        let polled = match tokio::time::timeout_at(deadline.into(), follower.poll()).await {
            Ok(polled) => polled?,
            Err(_) => break,
        };
        for i in polled {
            let (item, standing) = follower.entry(i);
            println!("{}", acknowledgement(&item.name, standing));
        }
        let now = Instant::now();
        if (!open && follower.all_settled()) || now >= deadline {
            break;
        }
        if !daemon_seen && now >= next_barrier {
            daemon_seen = crate::wait::barrier(config, None, deadline - now)
                .await
                .is_ok();
            next_barrier = now + Duration::from_secs(5);
        }
        if now >= next_progress {
            follower.progress("enqueue");
            next_progress = now + PROGRESS_EVERY;
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(now))).await;
    }
    let verdict = follower.verdict();
    for (path, why) in &verdict.pending {
        println!(
            "{}",
            json!({"path": path, "published": false, "state": "not_published", "reason": why})
        );
    }
    if open {
        return Err(PartialFailure(
            "stdin was still open at the deadline: what it had not sent yet was not queued".into(),
        )
        .into());
    }
    if !daemon_seen && !verdict.pending.is_empty() {
        bail!(
            "no daemon answered on {} while {} path(s) waited to be uploaded; start `nixpush daemon`",
            config.socket().display(),
            verdict.pending.len()
        );
    }
    match verdict.code() {
        0 => Ok(()),
        _ => Err(PartialFailure(format!(
            "{} path(s) not published",
            verdict.failed.len() + verdict.pending.len()
        ))
        .into()),
    }
}

fn acknowledgement(path: &str, standing: &Standing) -> serde_json::Value {
    match standing {
        Standing::Published => json!({"path": path, "published": true, "state": "published"}),
        Standing::Failed(why) => {
            json!({"path": path, "published": false, "state": "failed", "reason": why})
        }
        Standing::Gone(why) => {
            json!({"path": path, "published": false, "state": "gone", "reason": why})
        }
        Standing::Pending(..) | Standing::Unchecked => {
            json!({"path": path, "published": false, "state": "not_published"})
        }
    }
}
