//! `nixpush wait` and `nixpush mark`: the CI barrier. `wait` returns once everything recorded
//! before it began (or since a mark, or the closures of the paths it is given) is published, and
//! proves it by asking the cache; at its deadline it names what is not, and why.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nixpush_cache::{CacheReader, StoreUrl};
use nixpush_drain::ipc::{WireItem, WireKind};
use nixpush_format::StorePath;
use nixpush_queue::{Item, Kind, Queue, State};
use serde_json::json;

use crate::build_logs::{self, LogsDone, Which};
use crate::config::Config;
use crate::exit::PartialFailure;
use crate::record;

/// Wait until what was built here is in the cache (the CI barrier)
#[derive(clap::Args)]
pub struct WaitArgs {
    /// Give up after this many seconds: exit 1 naming each path not published and why (it stays
    /// queued for the daemon)
    #[arg(long, value_name = "SECONDS", default_value_t = 3600.0, value_parser = parse_seconds)]
    timeout: f64,
    /// Wait only for what was recorded after this mark (printed by `nixpush mark`)
    #[arg(long, value_name = "MARK", conflicts_with = "paths")]
    since: Option<Mark>,
    /// Exit 0 even when something is not published (or nothing can be uploaded), with warnings
    #[arg(long)]
    best_effort: bool,
    /// Print the outcome as JSON on stdout
    #[arg(long)]
    json: bool,
    /// Also upload the build logs written since --since's mark: those of failed builds (which
    /// run no post-build hook), or all
    #[arg(long, value_enum, value_name = "WHICH", default_value_t = Which::None)]
    logs: Which,
    /// The local store, for --logs (it tells failed builds): `daemon`, `unix://SOCKET`, `local`
    /// or `auto` [default: $NIX_REMOTE, else auto]
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Wait for these store paths' closures instead (queued now if they are not)
    #[arg(value_name = "PATH")]
    paths: Vec<String>,
}

/// Print a mark for `nixpush wait --since` and `enqueue --since`
#[derive(clap::Args)]
pub struct MarkArgs {}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds")),
    }
}

/// A point in the queue's history: the last request number, and when (Unix ms), written `N@T`.
/// The number scopes `wait --since`; the time scopes what the store registered (`enqueue
/// --since`) and which build logs are new (`wait --logs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub request: u64,
    pub at_ms: i64,
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.request, self.at_ms)
    }
}

impl FromStr for Mark {
    type Err = String;
    fn from_str(s: &str) -> Result<Mark, String> {
        let bad = || format!("{s:?} is not a mark: expected N@T as printed by `nixpush mark`");
        let (n, t) = s.trim().split_once('@').ok_or_else(bad)?;
        Ok(Mark {
            request: n.parse().map_err(|_| bad())?,
            at_ms: t.parse().map_err(|_| bad())?,
        })
    }
}

pub fn mark(_: MarkArgs) -> Result<()> {
    let config = Config::load()?;
    let at_ms = nixpush_queue::now_ms();
    // Created if need be: a mark taken before anything was recorded is 0.
    let queue = Queue::open(&config.state_dir())
        .with_context(|| format!("cannot open the queue in {}", config.state_dir().display()))?;
    println!(
        "{}",
        Mark {
            request: queue.mark()?,
            at_ms
        }
    );
    Ok(())
}

/// How often `wait` looks at the queue.
pub(crate) const POLL: Duration = Duration::from_millis(200);
/// How often it says where it stands, at the latest (CI systems kill steps that print nothing).
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// How long the daemon may take to answer a barrier (it waits for the requests before it).
pub(crate) const BARRIER_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times an item the queue says is published, but the cache does not have, is queued
/// again before it counts as failed.
const RECHECKS: u8 = 2;
/// HEAD requests at once for the final check.
const CHECKS_IN_FLIGHT: usize = 32;

/// Where one item of the wait stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Queued or in flight; the last error of an attempt, if any.
    Pending(State, Option<String>),
    /// The queue says published; the cache is still to confirm.
    Unchecked,
    /// Published, and the cache has every narinfo of it.
    Published,
    /// Failed for good (until `nixpush retry`).
    Failed(String),
    /// Gone from the store before it could be uploaded.
    Gone(String),
}

impl Standing {
    fn settled(&self) -> bool {
        matches!(
            self,
            Standing::Published | Standing::Failed(_) | Standing::Gone(_)
        )
    }

    fn from_queue(latest: Option<nixpush_queue::Latest>) -> Standing {
        let Some(l) = latest else {
            // Pruned history: only the cache can say.
            return Standing::Unchecked;
        };
        match l.state {
            State::Queued | State::InFlight => Standing::Pending(l.state, l.last_error),
            State::Done => Standing::Unchecked,
            State::Failed => Standing::Failed(l.last_error.unwrap_or_default()),
            State::Gone => Standing::Gone(l.last_error.unwrap_or_default()),
        }
    }
}

struct Entry {
    item: Item,
    standing: Standing,
    rechecks: u8,
    /// Why the cache could not be asked, when it could not.
    check_error: Option<String>,
}

/// The outcome, once everything settled or the deadline came.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub published: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub gone: Vec<(String, String)>,
    /// Not published by the deadline: (item, why).
    pub pending: Vec<(String, String)>,
    /// What `--logs` uploaded, and could not.
    pub logs: LogsDone,
}

impl Verdict {
    fn of(entries: &[Entry]) -> Verdict {
        let mut v = Verdict::default();
        for e in entries {
            let name = e.item.name.clone();
            match &e.standing {
                Standing::Published => v.published.push(name),
                Standing::Failed(why) => v.failed.push((name, why.clone())),
                Standing::Gone(why) => v.gone.push((name, why.clone())),
                Standing::Unchecked => v.pending.push((
                    name,
                    match &e.check_error {
                        Some(err) => format!("published, but the cache could not be asked: {err}"),
                        None => "published; the cache was not asked yet".into(),
                    },
                )),
                Standing::Pending(state, error) => v.pending.push((
                    name,
                    match (state, error) {
                        (_, Some(err)) => format!("still queued after: {err}"),
                        (State::InFlight, None) => "uploading".into(),
                        _ => "queued, no attempt finished yet".into(),
                    },
                )),
            }
        }
        v
    }

    /// 0 when everything in scope is published (a path gone from the store is only a warning:
    /// there was nothing left to upload) and every log asked for is uploaded, else 1.
    pub fn code(&self) -> u8 {
        if self.failed.is_empty() && self.pending.is_empty() && self.logs.errors.is_empty() {
            0
        } else {
            1
        }
    }
}

pub fn wait(args: WaitArgs) -> Result<()> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.timeout);
    if args.logs != Which::None && args.since.is_none() {
        bail!("--logs needs --since MARK: the logs written since the mark are uploaded");
    }
    let outcome = Config::load().and_then(|config| {
        let (url, runtime) = cache_to_check(&config)?;
        let outcome = runtime.block_on(run(&args, &config, url, deadline))?;
        Ok((config, outcome))
    });
    let (config, (verdict, daemon_seen, mark)) = match outcome {
        Ok(o) => o,
        Err(e) if args.best_effort => {
            eprintln!("nixpush wait: WARNING: {e:#} (--best-effort: exit 0)");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let elapsed = started.elapsed();
    let mut code = verdict.code();
    // Nothing could be uploaded: no daemon answered, and something is still waiting for one.
    let no_daemon = !daemon_seen && !verdict.pending.is_empty();
    if no_daemon {
        code = 2;
    }
    report(&args, &verdict, mark, elapsed, code, no_daemon);
    match code {
        0 => Ok(()),
        _ if args.best_effort => {
            eprintln!("nixpush wait: WARNING: not everything is published (--best-effort: exit 0)");
            Ok(())
        }
        2 => bail!(
            "no daemon answered on {} while {} item(s) waited to be uploaded; start `nixpush daemon`",
            config.socket().display(),
            verdict.pending.len()
        ),
        _ => {
            let mut what = Vec::new();
            let unpublished = verdict.failed.len() + verdict.pending.len();
            if unpublished > 0 {
                what.push(format!(
                    "{unpublished} of {} item(s) not published",
                    verdict.published.len() + unpublished + verdict.gone.len()
                ));
            }
            if !verdict.logs.errors.is_empty() {
                what.push(format!(
                    "{} build log(s) not uploaded",
                    verdict.logs.errors.len()
                ));
            }
            Err(PartialFailure(what.join("; ")).into())
        }
    }
}

/// The cache `wait` and `enqueue --wait` check, from the configuration, and a runtime to ask it in.
pub(crate) fn cache_to_check(config: &Config) -> Result<(StoreUrl, tokio::runtime::Runtime)> {
    let to = config.to.clone().context(
        "no cache to check: set `to` in the config file (NIXPUSH_CONFIG, default /etc/nixpush/nixpush.toml)",
    )?;
    let url: StoreUrl = to.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok((url, runtime))
}

/// Records the given paths, takes the barrier, then follows the items in scope until they settle
/// or the deadline comes. Returns the verdict, whether a daemon answered, and the mark waited up to.
async fn run(
    args: &WaitArgs,
    config: &Config,
    url: StoreUrl,
    deadline: Instant,
) -> Result<(Verdict, bool, u64)> {
    let given = if args.paths.is_empty() {
        None
    } else {
        let items = record::path_items(&args.paths)?;
        if let Some(roots) = config.gc_roots() {
            let problems = record::protect(&roots, &items);
            if !problems.is_empty() {
                eprintln!(
                    "nixpush wait: WARNING: {}",
                    problems.trim_start_matches("; ")
                );
            }
        }
        if let Err(e) = record::record(config, &items, Duration::from_secs(5)) {
            bail!("could not queue the paths: {e}");
        }
        Some(items)
    };
    let since = args.since.map(|m| m.request);
    let state_dir = config.state_dir();
    if !state_dir.join("queue.sqlite").exists() {
        bail!(
            "no queue in {}: nothing was recorded here (is post-build-hook set to nixpush-hook, with this configuration?)",
            state_dir.display()
        );
    }
    let queue = Queue::open(&state_dir)
        .with_context(|| format!("cannot open the queue in {}", state_dir.display()))?;
    let (mut daemon_seen, mark) = match barrier(config, since, BARRIER_TIMEOUT).await {
        Ok(mark) => (true, mark),
        Err(e) => {
            eprintln!(
                "nixpush wait: WARNING: the daemon did not answer ({e}); waiting for it to upload what is queued"
            );
            (false, queue.mark()?)
        }
    };
    let scope: Vec<Item> = match &given {
        Some(items) => items.iter().map(WireItem::to_item).collect(),
        None => queue.scope(since)?,
    };
    // The builds whose logs are wanted ended before `wait` began: theirs go first.
    let logs = match args.since {
        Some(m) => build_logs::upload(&url, args.store.clone(), args.logs, m.at_ms, deadline).await,
        None => LogsDone::default(),
    };
    let mut follower = Follower::new(config.clone(), url, queue);
    follower.add(scope);
    eprintln!(
        "nixpush wait: waiting for {} item(s){}",
        follower.entries.len(),
        match args.since {
            Some(m) => format!(" recorded since mark {m}"),
            None if given.is_some() => String::new(),
            None => " recorded before now".into(),
        }
    );
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    let mut next_barrier = Instant::now() + Duration::from_secs(5);
    loop {
        // A cache that answers slowly must not carry the wait past its deadline.
        match tokio::time::timeout_at(deadline.into(), follower.poll()).await {
            Ok(polled) => {
                polled?;
            }
            Err(_) => break,
        }
        let now = Instant::now();
        if follower.all_settled() || now >= deadline {
            break;
        }
        if now >= next_progress {
            follower.progress("wait");
            next_progress = now + PROGRESS_EVERY;
        }
        if !daemon_seen && now >= next_barrier {
            // A daemon that comes up late still gets the barrier, and with it the expedite.
            if barrier(config, since, deadline - now).await.is_ok() {
                daemon_seen = true;
                eprintln!("nixpush wait: the daemon answered");
            }
            next_barrier = now + Duration::from_secs(5);
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(now))).await;
    }
    let mut verdict = follower.verdict();
    verdict.logs = logs;
    Ok((verdict, daemon_seen, mark))
}

/// Follows items through the queue to the cache: what `wait` and `enqueue --wait` share.
pub(crate) struct Follower {
    entries: Vec<Entry>,
    queue: Queue,
    url: StoreUrl,
    cache: Option<Arc<CacheReader>>,
    config: Config,
}

impl Follower {
    pub(crate) fn new(config: Config, url: StoreUrl, queue: Queue) -> Self {
        Follower {
            entries: Vec::new(),
            queue,
            url,
            cache: None,
            config,
        }
    }

    pub(crate) fn add(&mut self, items: impl IntoIterator<Item = Item>) {
        self.entries.extend(items.into_iter().map(|item| Entry {
            item,
            standing: Standing::Pending(State::Queued, None),
            rechecks: 0,
            check_error: None,
        }));
    }

    pub(crate) fn all_settled(&self) -> bool {
        self.entries.iter().all(|e| e.standing.settled())
    }

    pub(crate) fn verdict(&self) -> Verdict {
        Verdict::of(&self.entries)
    }

    /// The item at `i`, and where it stands.
    pub(crate) fn entry(&self, i: usize) -> (&Item, &Standing) {
        (&self.entries[i].item, &self.entries[i].standing)
    }

    /// Looks at the queue, then asks the cache about what the queue calls published. Returns the
    /// indices of the items that settled in this call.
    pub(crate) async fn poll(&mut self) -> Result<Vec<usize>> {
        let before: Vec<bool> = self.entries.iter().map(|e| e.standing.settled()).collect();
        for e in self.entries.iter_mut().filter(|e| !e.standing.settled()) {
            if e.standing != Standing::Unchecked {
                e.standing = Standing::from_queue(self.queue.latest(&e.item.name)?);
            }
        }
        if self
            .entries
            .iter()
            .any(|e| e.standing == Standing::Unchecked)
        {
            check_cache(&self.url, &mut self.cache, &mut self.entries, &self.config).await;
        }
        Ok(self
            .entries
            .iter()
            .zip(before)
            .enumerate()
            .filter(|(_, (e, was))| !was && e.standing.settled())
            .map(|(i, _)| i)
            .collect())
    }

    /// One line on stderr: how many items stand where, and the latest error.
    pub(crate) fn progress(&self, command: &str) {
        progress(command, &self.entries);
    }
}

pub(crate) async fn barrier(
    config: &Config,
    since: Option<u64>,
    timeout: Duration,
) -> Result<u64, String> {
    let config = config.clone();
    let timeout = timeout.clamp(Duration::from_millis(100), BARRIER_TIMEOUT);
    tokio::task::spawn_blocking(move || record::barrier(&config, since, timeout))
        .await
        .map_err(|e| e.to_string())?
}

/// The narinfos that say an item is in the cache: the path itself, or a derivation's outputs.
/// `Err((gone, why))`: `gone` when the derivation's file is no longer in the store.
fn published_paths(item: &Item) -> Result<Vec<StorePath>, (bool, String)> {
    let path: StorePath = item.name.parse().map_err(|e| (false, format!("{e}")))?;
    match item.kind {
        Kind::Path => Ok(vec![path]),
        // Outputs a derivation does not fix (floating content-addressed) cannot be named: only the
        // queue's word is left for those.
        Kind::Derivation => nixpush_store::GcRoots::paths_of(&path)
            .map(|mut p| p.split_off(1))
            .map_err(|e| {
                (
                    e.kind() == std::io::ErrorKind::NotFound,
                    format!("cannot read the outputs of {}: {e}", item.name),
                )
            }),
    }
}

/// HEADs the narinfos of the items the queue calls published. Present: published. Absent: queued
/// again (a collection or another tool deleted it, or an earlier upload never finished), up to
/// [`RECHECKS`] times. The cache unreachable: asked again at the next poll.
async fn check_cache(
    url: &StoreUrl,
    cache: &mut Option<Arc<CacheReader>>,
    entries: &mut [Entry],
    config: &Config,
) {
    let target = match cache {
        Some(t) => t.clone(),
        None => match CacheReader::open(url).await {
            Ok(t) => cache.insert(Arc::new(t)).clone(),
            Err(e) => {
                let e = format!("{:#}", anyhow::Error::from(e));
                for entry in entries.iter_mut() {
                    entry.check_error = Some(e.clone());
                }
                return;
            }
        },
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(CHECKS_IN_FLIGHT));
    let mut checks = tokio::task::JoinSet::new();
    for (i, e) in entries.iter_mut().enumerate() {
        if e.standing != Standing::Unchecked {
            continue;
        }
        let paths = match published_paths(&e.item) {
            Ok(paths) => paths,
            Err((true, why)) => {
                // A derivation collected after its outputs were published (their roots go with
                // the item): only the queue's word is left.
                eprintln!(
                    "nixpush wait: WARNING: {why}; taking the queue's word that it is published"
                );
                e.standing = Standing::Published;
                continue;
            }
            Err((false, why)) => {
                e.check_error = Some(why);
                continue;
            }
        };
        let (target, limit) = (target.clone(), limit.clone());
        checks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let mut missing = Vec::new();
            for p in paths {
                match target.has(&p).await {
                    Ok(true) => {}
                    Ok(false) => missing.push(p.to_string()),
                    Err(err) => {
                        return Err(format!("{p}: {:#}", anyhow::Error::from(err)));
                    }
                }
            }
            Ok::<_, String>((i, missing))
        });
    }
    let mut again = Vec::new();
    while let Some(done) = checks.join_next().await {
        match done {
            Ok(Ok((i, missing))) if missing.is_empty() => entries[i].standing = Standing::Published,
            Ok(Ok((i, missing))) => {
                let e = &mut entries[i];
                e.rechecks += 1;
                if e.rechecks > RECHECKS {
                    e.standing = Standing::Failed(format!(
                        "the queue says published, but the cache does not have {} (queued again {RECHECKS} times)",
                        missing.join(", ")
                    ));
                } else {
                    eprintln!(
                        "nixpush wait: {} is not in the cache although it was published; queued again",
                        missing.join(", ")
                    );
                    again.push(i);
                }
            }
            Ok(Err(err)) => {
                for e in entries.iter_mut() {
                    if e.standing == Standing::Unchecked {
                        e.check_error = Some(err.clone());
                    }
                }
            }
            Err(err) => tracing::error!(error = %err, "a cache check panicked"),
        }
    }
    if again.is_empty() {
        return;
    }
    let items: Vec<WireItem> = again
        .iter()
        .map(|&i| WireItem {
            name: entries[i].item.name.clone(),
            kind: match entries[i].item.kind {
                Kind::Path => WireKind::Path,
                Kind::Derivation => WireKind::Drv,
            },
        })
        .collect();
    let config = config.clone();
    let recorded = tokio::task::spawn_blocking(move || {
        record::record(&config, &items, Duration::from_secs(5))
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("recording panicked: {e}")));
    for i in again {
        entries[i].standing = match &recorded {
            Ok(()) => Standing::Pending(State::Queued, None),
            Err(why) => Standing::Failed(format!(
                "missing from the cache, and could not be queued again: {why}"
            )),
        };
    }
}

fn progress(command: &str, entries: &[Entry]) {
    let mut by: HashMap<&str, usize> = HashMap::new();
    let mut last_error = None;
    for e in entries {
        let what = match &e.standing {
            Standing::Pending(State::InFlight, _) => "uploading",
            Standing::Pending(_, err) => {
                if let Some(err) = err {
                    last_error = Some((e.item.name.as_str(), err.as_str()));
                }
                "queued"
            }
            Standing::Unchecked => "checking",
            Standing::Published => "published",
            Standing::Failed(_) => "failed",
            Standing::Gone(_) => "gone",
        };
        *by.entry(what).or_default() += 1;
    }
    let mut parts: Vec<String> = [
        "published",
        "uploading",
        "queued",
        "checking",
        "failed",
        "gone",
    ]
    .iter()
    .filter_map(|k| by.get(k).map(|n| format!("{n} {k}")))
    .collect();
    if let Some((item, err)) = last_error {
        parts.push(format!("last error: {item}: {err}"));
    }
    eprintln!(
        "nixpush {command}: {} of {} published: {}",
        by.get("published").copied().unwrap_or(0),
        entries.len(),
        parts.join(", ")
    );
}

fn report(args: &WaitArgs, v: &Verdict, mark: u64, elapsed: Duration, code: u8, no_daemon: bool) {
    for (item, why) in &v.gone {
        eprintln!(
            "nixpush wait: WARNING: {item}: gone from the store before it was uploaded ({why})"
        );
    }
    for (item, why) in &v.failed {
        eprintln!("nixpush wait: FAILED {item}: {why}");
    }
    for (item, why) in &v.pending {
        eprintln!("nixpush wait: NOT PUBLISHED {item}: {why} (it stays queued for the daemon)");
    }
    for (drv, failed) in &v.logs.uploaded {
        let build = if *failed { "failed build" } else { "build" };
        eprintln!("nixpush wait: uploaded the log of {build} {drv}");
    }
    for (drv, why) in &v.logs.errors {
        eprintln!("nixpush wait: LOG NOT UPLOADED {drv}: {why}");
    }
    for (drv, why) in &v.logs.skipped {
        eprintln!("nixpush wait: WARNING: log of {drv} skipped: {why}");
    }
    eprintln!(
        "nixpush wait: {} published, {} failed, {} not published in time, {} gone, in {:.1} s",
        v.published.len(),
        v.failed.len(),
        v.pending.len(),
        v.gone.len(),
        elapsed.as_secs_f64()
    );
    if args.logs != Which::None {
        eprintln!(
            "nixpush wait: build logs: {} uploaded, {} not uploaded, {} skipped",
            v.logs.uploaded.len(),
            v.logs.errors.len(),
            v.logs.skipped.len()
        );
    }
    if args.json {
        let pairs = |l: &[(String, String)]| {
            l.iter()
                .map(|(p, why)| json!({"path": p, "reason": why}))
                .collect::<Vec<_>>()
        };
        let out = json!({
            "exit": if args.best_effort { 0 } else { code },
            "mark": mark,
            "elapsed_s": elapsed.as_secs_f64(),
            "published": v.published,
            "failed": pairs(&v.failed),
            "not_published": pairs(&v.pending),
            "gone": pairs(&v.gone),
            "logs": v.logs.uploaded.iter().map(|(drv, failed)| json!({"drv": drv, "failed": failed})).collect::<Vec<_>>(),
            "log_errors": pairs(&v.logs.errors),
            "logs_skipped": pairs(&v.logs.skipped),
            "no_daemon": no_daemon,
        });
        println!("{out}");
    }
    if let Some(file) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|f| !f.is_empty()) {
        let summary = step_summary(v, elapsed);
        let written = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&file)
            .and_then(|mut f| f.write_all(summary.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "nixpush wait: WARNING: cannot append to GITHUB_STEP_SUMMARY {}: {e}",
                std::path::Path::new(&file).display()
            );
        }
    }
}

/// A short Markdown summary for the GitHub job page: the counts, and each path not published.
pub fn step_summary(v: &Verdict, elapsed: Duration) -> String {
    let mut s = format!(
        "### nixpush: {} published, {} failed, {} not published in time, {} gone ({:.0} s)\n",
        v.published.len(),
        v.failed.len(),
        v.pending.len(),
        v.gone.len(),
        elapsed.as_secs_f64()
    );
    let rows: Vec<_> = v
        .failed
        .iter()
        .map(|(p, w)| ("failed", p, w))
        .chain(v.pending.iter().map(|(p, w)| ("not published", p, w)))
        .chain(v.gone.iter().map(|(p, w)| ("gone", p, w)))
        .chain(
            v.logs
                .errors
                .iter()
                .map(|(p, w)| ("log not uploaded", p, w)),
        )
        .collect();
    if !rows.is_empty() {
        s.push_str("\n| path | state | reason |\n|---|---|---|\n");
        for (state, path, why) in rows {
            // A table cell holds one line, and `|` would end it.
            let why = why.replace('|', "\\|").replace('\n', " ");
            s.push_str(&format!("| `{path}` | {state} | {why} |\n"));
        }
    }
    let failed_builds: Vec<String> = v
        .logs
        .uploaded
        .iter()
        .filter(|(_, failed)| *failed)
        .map(|(drv, _)| format!("`{drv}`"))
        .collect();
    if !failed_builds.is_empty() {
        s.push_str(&format!(
            "\nfailed builds (logs uploaded): {}; `nix log DRV` reads one where the derivation is in the store and the cache is a substituter\n",
            failed_builds.join(", ")
        ));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, standing: Standing) -> Entry {
        Entry {
            item: Item {
                name: name.into(),
                kind: Kind::Path,
            },
            standing,
            rechecks: 0,
            check_error: None,
        }
    }

    #[test]
    fn marks_round_trip_and_bad_ones_are_named() {
        let m: Mark = "42@1764490000123".parse().unwrap();
        assert_eq!(
            m,
            Mark {
                request: 42,
                at_ms: 1764490000123
            }
        );
        assert_eq!(m.to_string().parse::<Mark>().unwrap(), m);
        for bad in ["", "42", "x@1", "1@", "@5", "-1@5"] {
            let e = bad.parse::<Mark>().unwrap_err();
            assert!(e.contains("not a mark"), "{bad}: {e}");
        }
    }

    #[test]
    fn only_what_is_published_and_checked_exits_0() {
        let all_good = [
            entry("a", Standing::Published),
            entry("g", Standing::Gone("GC".into())),
        ];
        let v = Verdict::of(&all_good);
        assert_eq!(v.code(), 0, "gone is a warning: nothing was left to upload");
        for bad in [
            Standing::Failed("403".into()),
            Standing::Pending(State::Queued, Some("connection refused".into())),
            Standing::Pending(State::InFlight, None),
            Standing::Unchecked,
        ] {
            let v = Verdict::of(&[entry("a", Standing::Published), entry("b", bad.clone())]);
            assert_eq!(v.code(), 1, "{bad:?}");
            let named = v.failed.iter().chain(&v.pending).any(|(p, _)| p == "b");
            assert!(named, "{bad:?} is named: {v:?}");
        }
        let v = Verdict::of(&[entry(
            "b",
            Standing::Pending(State::Queued, Some("dns error".into())),
        )]);
        assert!(
            v.pending[0].1.contains("dns error"),
            "the last error is the reason"
        );
    }

    #[test]
    fn the_queue_state_maps_to_a_standing() {
        let latest = |state, err: Option<&str>| nixpush_queue::Latest {
            state,
            attempts: 1,
            last_error: err.map(Into::into),
            next_attempt_at: 0,
            requested: 1,
        };
        assert_eq!(
            Standing::from_queue(Some(latest(State::Done, None))),
            Standing::Unchecked,
            "published means checked in the cache first"
        );
        assert_eq!(Standing::from_queue(None), Standing::Unchecked);
        assert_eq!(
            Standing::from_queue(Some(latest(State::Failed, Some("hash mismatch")))),
            Standing::Failed("hash mismatch".into())
        );
        assert!(!Standing::from_queue(Some(latest(State::InFlight, None))).settled());
    }

    #[test]
    fn the_step_summary_lists_each_problem_on_one_table_row() {
        let v = Verdict {
            published: vec!["/nix/store/a".into()],
            failed: vec![("/nix/store/b".into(), "bad | thing\nsecond line".into())],
            pending: vec![("/nix/store/c".into(), "503".into())],
            gone: vec![],
            logs: LogsDone {
                uploaded: vec![("/nix/store/d.drv".into(), true)],
                errors: vec![("/nix/store/e.drv".into(), "403".into())],
                skipped: vec![],
            },
        };
        let s = step_summary(&v, Duration::from_secs(12));
        assert!(s.starts_with("### nixpush: 1 published, 1 failed, 1 not published in time"));
        assert!(s.contains("| `/nix/store/b` | failed | bad \\| thing second line |\n"));
        assert!(s.contains("| `/nix/store/c` | not published | 503 |\n"));
        assert!(s.contains("| `/nix/store/e.drv` | log not uploaded | 403 |\n"));
        assert!(s.contains("failed builds (logs uploaded): `/nix/store/d.drv`"));
    }
}
