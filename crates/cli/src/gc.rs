//! `nixpush gc`, `pin`, `unpin` and `pins`: retention for a shared cache (see README.md,
//! "Retention").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nixpush_cache::{Objects, StoreUrl};
use nixpush_retention::RetentionError;
use nixpush_retention::collect::{Collector, MaxDelete, Policy, Report};
use nixpush_retention::pins;
use serde_json::json;

use crate::paths;
use crate::report::human_bytes;

/// The shortest `--keep-within`: what a pusher may take between a NAR and its narinfo.
const MIN_KEEP_WITHIN: Duration = nixpush_cache::fence::NAR_WINDOW;

/// Delete what no root needs from a cache: roots are pins, recent push sessions and recent
/// narinfos; closures are never broken
#[derive(clap::Args)]
#[command(after_help = "\
Exit codes:
  0  the collection ran (or, with --dry-run, planned) to its end
  2  it did not run, or stopped with nothing more deleted: another collection is under way, \
--max-delete refused the plan, or a read or delete failed (the cache is left closed)")]
pub struct GcArgs {
    /// The cache: s3://BUCKET?… or file:///DIR
    #[arg(long, value_name = "STORE_URL")]
    store: String,
    /// Push sessions and narinfos written this recently are roots (at least 1h)
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    keep_within: Duration,
    /// Also keep each host's N newest push sessions, however old (a session covers the pushes one
    /// process began within 15 minutes, up to 4,096 paths and NARs)
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Delete a NAR only once no narinfo has needed it for this long: clients cache the narinfos
    /// they read for narinfo-cache-positive-ttl (30 days by default)
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    nar_grace: Duration,
    /// Print the plan and change nothing
    #[arg(long)]
    dry_run: bool,
    /// Refuse a plan that deletes more narinfos than this (a count, or a share such as 10%)
    #[arg(long, value_name = "N|P%")]
    max_delete: Option<MaxDelete>,
    /// The server ignores conditional writes (Garage): vouch that no other collection runs at once
    #[arg(long)]
    single_runner: bool,
    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,
    /// Where to remember what was read of each narinfo between runs, so that a run reads only what
    /// is new [default: ~/.cache/nixpush/gc-HASH.json]
    #[arg(long, value_name = "FILE", conflicts_with = "no_memo")]
    memo: Option<std::path::PathBuf>,
    /// Read every narinfo, remembering nothing
    #[arg(long)]
    no_memo: bool,
    /// Write the run's figures in Prometheus's text format to this file (atomically), for
    /// node_exporter's textfile collector; a run that stops says so there too
    #[arg(long, value_name = "FILE")]
    metrics_textfile: Option<std::path::PathBuf>,
}

/// Pin store paths in a cache: every collection keeps their closures
#[derive(clap::Args)]
pub struct PinArgs {
    /// The cache: s3://BUCKET?… or file:///DIR
    #[arg(long, value_name = "STORE_URL")]
    store: String,
    /// The pin's name (a pin of the same name is replaced)
    name: String,
    /// Store paths, or symlinks into the store (./result)
    #[arg(value_name = "PATH", required = true)]
    paths: Vec<String>,
    /// Let the pin lapse after this long (30d, 12h)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    expires_in: Option<Duration>,
}

/// Remove a pin
#[derive(clap::Args)]
pub struct UnpinArgs {
    #[arg(long, value_name = "STORE_URL")]
    store: String,
    name: String,
}

/// List a cache's pins
#[derive(clap::Args)]
pub struct PinsArgs {
    #[arg(long, value_name = "STORE_URL")]
    store: String,
    /// Print them as JSON on stdout
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (30d, 12h): {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Opens the cache to change it, or only to read it (a dry run, a listing).
async fn open(
    store: &str,
    write: bool,
    observer: Option<nixpush_cache::RequestObserver>,
) -> Result<Objects> {
    let url: StoreUrl = store.parse()?;
    let opened = if write {
        Objects::open(&url, observer).await
    } else {
        Objects::open_read(&url, observer).await
    };
    opened.with_context(|| format!("cannot open the cache {}", url.display_base()))
}

pub fn gc(args: GcArgs) -> Result<()> {
    if args.keep_within < MIN_KEEP_WITHIN {
        bail!(
            "--keep-within {} is shorter than {}: a push may take that long between a NAR and its narinfo",
            humantime::format_duration(args.keep_within),
            humantime::format_duration(MIN_KEEP_WITHIN)
        );
    }
    let policy = Policy {
        keep_within: args.keep_within,
        keep_last: args.keep_last,
        nar_grace: args.nar_grace,
        max_delete: args.max_delete,
        dry_run: args.dry_run,
        single_runner: args.single_runner,
        memo: if args.no_memo {
            None
        } else {
            args.memo
                .clone()
                .or_else(|| nixpush_retention::memo::default_path(&args.store))
        },
    };
    let requests: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let counted = requests.clone();
    let observer: nixpush_cache::RequestObserver = Arc::new(move |operation, _| {
        *counted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(operation.to_owned())
            .or_default() += 1;
    });
    let report = runtime()?.block_on(async {
        let objects = open(&args.store, !args.dry_run, Some(observer)).await?;
        let collected = async {
            let collector =
                Collector::begin(objects, policy, &nixpush_cache::session::local_host()).await?;
            eprintln!(
                "nixpush gc: run {}{}",
                collector.run_id(),
                if args.dry_run { " (dry run)" } else { "" }
            );
            collector.run().await
        };
        collected
            .await
            .map_err(|e: RetentionError| anyhow::Error::from(e).context("nixpush gc stopped"))
    });
    if let Some(file) = &args.metrics_textfile
        && !args.dry_run
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let text = nixpush_retention::metrics::render(report.as_ref().ok(), now);
        let tmp = file.with_extension("prom.tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = written {
            eprintln!(
                "nixpush gc: WARNING: cannot write the metrics file {}: {e}",
                file.display()
            );
        }
    }
    let report = report?;
    print(&report);
    let requests = requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if !requests.is_empty() {
        let list: Vec<String> = requests.iter().map(|(op, n)| format!("{op} {n}")).collect();
        eprintln!("nixpush gc: S3 requests: {}", list.join(", "));
    }
    if args.json {
        let mut out = serde_json::to_value(&report)?;
        out["requests"] = serde_json::to_value(&requests)?;
        println!("{out}");
    }
    Ok(())
}

fn print(r: &Report) {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    eprintln!(
        "nixpush gc: {} narinfos ({} read), {} live (roots: {} pins, {} of {} sessions kept, and what was written within the window); {} session reads over both marks",
        r.narinfos, r.narinfos_read, r.live, r.pins, r.sessions_kept, r.sessions, r.sessions_read
    );
    eprintln!(
        "nixpush gc: {verb} {} narinfos (NARs of {}); NARs no narinfo needs: {} ({}), {} waiting out the NAR grace",
        r.dead,
        human_bytes(r.dead_nar_bytes),
        r.nar_garbage,
        human_bytes(r.nar_garbage_bytes),
        r.nars_in_grace
    );
    if !r.dry_run {
        eprintln!(
            "nixpush gc: deleted {} narinfos, {} NARs, {} logs, {} sessions in {:.1} s",
            r.deleted_narinfos, r.deleted_nars, r.deleted_logs, r.deleted_sessions, r.seconds
        );
    }
    match r.versioning.as_str() {
        "Enabled" => eprintln!(
            "nixpush gc: bucket versioning is on: what was deleted stays restorable as noncurrent versions until the bucket's lifecycle removes them"
        ),
        "not a bucket" => {}
        other => eprintln!("nixpush gc: bucket versioning: {other}: deletions cannot be undone"),
    }
    if !r.missing_references.is_empty() {
        eprintln!(
            "nixpush gc: WARNING: {} referenced paths have no narinfo (holes this run did not make; see `nixpush verify --all`)",
            r.missing_references.len()
        );
    }
}

pub fn pin(args: PinArgs) -> Result<()> {
    let paths = args
        .paths
        .iter()
        .map(|p| paths::store_path_of(p))
        .collect::<Result<Vec<_>>>()?;
    let pin = runtime()?.block_on(async {
        let objects = open(&args.store, true, None).await?;
        Ok::<_, anyhow::Error>(pins::pin(&objects, &args.name, &paths, args.expires_in).await?)
    })?;
    eprintln!(
        "nixpush pin: {} pins {} path(s){}",
        args.name,
        pin.paths.len(),
        pin.expires
            .map(|e| format!(
                ", until {}",
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(e))
            ))
            .unwrap_or_default()
    );
    Ok(())
}

pub fn unpin(args: UnpinArgs) -> Result<()> {
    let existed = runtime()?.block_on(async {
        let objects = open(&args.store, true, None).await?;
        Ok::<_, anyhow::Error>(pins::unpin(&objects, &args.name).await?)
    })?;
    if !existed {
        bail!("no pin named {:?}", args.name);
    }
    Ok(())
}

pub fn list(args: PinsArgs) -> Result<()> {
    let all = runtime()?.block_on(async {
        let objects = open(&args.store, false, None).await?;
        Ok::<_, anyhow::Error>(pins::list(&objects).await?)
    })?;
    if args.json {
        let out: Vec<_> = all
            .iter()
            .map(|(name, p)| json!({"name": name, "paths": p.paths, "created": p.created, "expires": p.expires}))
            .collect();
        println!("{}", serde_json::Value::from(out));
        return Ok(());
    }
    let now = std::time::SystemTime::now();
    for (name, p) in &all {
        let state = if p.expired(now) { " (expired)" } else { "" };
        println!("{name}{state}");
        for path in &p.paths {
            println!("  {path}");
        }
    }
    Ok(())
}
