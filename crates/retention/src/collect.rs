//! One collection of a cache: fence, mark, announce, mark again, delete, sweep NARs, release (see
//! README.md, "Retention", for the protocol and why it holds).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nixpush_cache::fence::{CLOCK_SKEW, GcState, LEASE, NAR_WINDOW, Phase, STATE_KEY};
use nixpush_cache::session::{SESSIONS_PREFIX, Session};
use nixpush_cache::{CacheError, Conditional, Expect, ObjectEntry, Objects, error_chain};
use nixpush_format::NarInfo;
use serde::Serialize;

use crate::RetentionError;
use crate::memo;
use crate::pins;
use crate::plan::{self, Node};

/// Requests at once while reading.
const IN_FLIGHT: usize = 64;
/// Keys a DeleteObjects request takes at most, and such requests at once.
const DELETE_BATCH: usize = 1000;
const BATCHES_IN_FLIGHT: usize = 4;
/// The collector rewrites its state (renewing its lease) at least this often, whatever phase it is
/// in.
const RENEW_EVERY: Duration = Duration::from_secs(60);
/// It stops writing and deleting this long before its lease runs out, so that a request sent just
/// before reaches the server before pushers count the run as ended.
const LEASE_MARGIN: Duration = Duration::from_secs(60);
/// Where the NARs found orphaned, and since when, are kept between runs (the NAR grace).
pub const ORPHANS_KEY: &str = "nixpush/gc/orphans.json";
pub const REPORTS_PREFIX: &str = "nixpush/gc/reports/";
const JSON: &str = "application/json";

/// What a collection keeps, and how careful it is.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Sessions and narinfos written this recently are roots.
    pub keep_within: Duration,
    /// Each host's newest sessions are roots, however old.
    pub keep_last: Option<usize>,
    /// A NAR no narinfo needs goes only after it has been so for this long: clients keep the
    /// narinfos they read for `narinfo-cache-positive-ttl` (30 days by default).
    pub nar_grace: Duration,
    /// A plan that deletes more narinfos than this is refused.
    pub max_delete: Option<MaxDelete>,
    pub dry_run: bool,
    /// The operator vouches that no other collection runs at once (for servers without
    /// conditional writes).
    pub single_runner: bool,
    /// Where what was read of narinfos is remembered between runs (see [`crate::memo`]).
    pub memo: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxDelete {
    Count(u64),
    Percent(f64),
}

impl std::str::FromStr for MaxDelete {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a count or a percentage (such as 500 or 10%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<f64>() {
                Ok(v) if (0.0..=100.0).contains(&v) => Ok(MaxDelete::Percent(v)),
                _ => Err(bad()),
            },
            None => s.parse().map(MaxDelete::Count).map_err(|_| bad()),
        }
    }
}

impl MaxDelete {
    fn allows(self, dead: u64, of: u64) -> bool {
        match self {
            MaxDelete::Count(n) => dead <= n,
            MaxDelete::Percent(p) => of == 0 || dead as f64 * 100.0 <= p * of as f64,
        }
    }
}

/// What a collection found and did; written to `nixpush/gc/reports/<run>.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub run: String,
    pub host: String,
    pub dry_run: bool,
    /// The run's start by the server's clock (Unix seconds).
    pub t0: u64,
    pub pins: usize,
    pub sessions: usize,
    pub sessions_kept: usize,
    /// Session reads (GET) over both marks: the second reads only those written since the first.
    pub sessions_read: usize,
    pub narinfos: usize,
    /// Narinfos read (GET) in all: those new or changed since the memo, and again in later marks.
    pub narinfos_read: usize,
    pub live: usize,
    /// Dead narinfos, and the bytes of their NARs (as their narinfos say).
    pub dead: usize,
    pub dead_nar_bytes: u64,
    pub nars: usize,
    /// NARs no surviving narinfo needs: deleted now (past the grace), or waiting for it.
    pub nar_garbage: usize,
    pub nar_garbage_bytes: u64,
    pub nars_in_grace: usize,
    pub logs_garbage: usize,
    pub deleted_narinfos: usize,
    pub deleted_nars: usize,
    pub deleted_logs: usize,
    pub deleted_sessions: usize,
    /// References that have no narinfo (a hole found, not made, by this run).
    pub missing_references: Vec<String>,
    /// The bucket's versioning: `Enabled` (deleted objects stay restorable as noncurrent
    /// versions), `Suspended`, `off`, `not a bucket`, or why it could not be asked.
    pub versioning: String,
    pub seconds: f64,
}

/// One narinfo as listed and read.
#[derive(Clone)]
struct Listed {
    entry: ObjectEntry,
    node: Node,
    deriver: Option<String>,
    file_size: u64,
}

pub struct Collector {
    objects: Objects,
    policy: Policy,
    report: Report,
    started: Instant,
    /// The state as written last, and its entity tag.
    state: GcState,
    etag: Option<String>,
    /// When the last state write was sent: the lease counts from then.
    renewed: Instant,
    t0: SystemTime,
    /// The sessions read by an earlier mark of this run, by key, with what told their version
    /// apart: the next mark reads again only those that changed.
    sessions_seen: HashMap<String, (String, Arc<Session>)>,
}

impl Collector {
    /// Fences the cache for a collection by `host`: refuses when another is under way, moves the
    /// state to Marking, and takes the server's time of that write as the run's start.
    pub async fn begin(
        objects: Objects,
        policy: Policy,
        host: &str,
    ) -> Result<Self, RetentionError> {
        let run = format!(
            "{}-{:08x}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            getrandom::u32().unwrap_or_default()
        );
        let (current, entry) = read_state(&objects).await?;
        if policy.dry_run {
            // A plan writes nothing, the fence included; the local clock stands in for the
            // server's.
            let state = current.unwrap_or(GcState {
                seq: 0,
                phase: Phase::Idle,
                run: run.clone(),
                host: host.to_owned(),
            });
            return Ok(Self::new(
                objects,
                policy,
                host,
                run,
                state,
                None,
                SystemTime::now(),
            ));
        }
        if !policy.single_runner {
            check_conditional_writes(&objects, &run).await?;
        }
        let seq = match (&current, &entry) {
            (None, _) => 0,
            (Some(s), _) if s.phase == Phase::Idle => s.seq,
            (Some(s), Some(e)) => {
                let now = SystemTime::now();
                let abandoned = e.modified.is_some_and(|m| m + LEASE + CLOCK_SKEW < now);
                if !abandoned {
                    return Err(RetentionError::Busy {
                        run: s.run.clone(),
                        host: s.host.clone(),
                        phase: format!("{:?}", s.phase).to_lowercase(),
                    });
                }
                tracing::warn!(run = %s.run, host = %s.host, "taking over from a collection that stopped renewing its lease");
                // Pushers already count it as ended, one step on (see GcState::observation).
                s.seq + 1
            }
            (Some(s), None) => s.seq,
        };
        let state = GcState {
            seq: seq + 1,
            phase: Phase::Marking,
            run: run.clone(),
            host: host.to_owned(),
        };
        let expect = match &entry {
            Some(e) => Expect::Etag(e.etag.clone().ok_or(RetentionError::NoEtag)?),
            None => Expect::Absent,
        };
        let sent = Instant::now();
        let etag = write_state(&objects, &state, &expect, policy.single_runner).await?;
        let written = objects
            .head(STATE_KEY)
            .await?
            .ok_or(RetentionError::Raced)?;
        let t0 = written.modified.unwrap_or_else(SystemTime::now);
        let mut collector = Self::new(objects, policy, host, run, state, etag.or(written.etag), t0);
        collector.renewed = sent;
        Ok(collector)
    }

    fn new(
        objects: Objects,
        policy: Policy,
        host: &str,
        run: String,
        state: GcState,
        etag: Option<String>,
        t0: SystemTime,
    ) -> Self {
        let report = Report {
            run,
            host: host.to_owned(),
            dry_run: policy.dry_run,
            t0: t0.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            ..Report::default()
        };
        Collector {
            objects,
            policy,
            report,
            started: Instant::now(),
            state,
            etag,
            renewed: Instant::now(),
            t0,
            sessions_seen: HashMap::new(),
        }
    }

    pub fn run_id(&self) -> &str {
        &self.report.run
    }

    /// Runs the collection to its end. On any error the state goes back to Idle (as far as the
    /// cache can still be written) and the error is returned; whatever was deleted until then left
    /// the cache closed.
    pub async fn run(mut self) -> Result<Report, RetentionError> {
        let outcome = self.collect().await;
        let released = if self.policy.dry_run {
            Ok(())
        } else {
            self.set_phase(Phase::Idle).await
        };
        self.report.seconds = self.started.elapsed().as_secs_f64();
        if !self.policy.dry_run {
            let key = format!("{REPORTS_PREFIX}{}.json", self.report.run);
            let body = serde_json::to_vec_pretty(&self.report).expect("the report serializes");
            if let Err(e) = self.objects.put(&key, body, JSON).await {
                tracing::warn!(error = %error_chain(&e), "cannot write the report");
            }
        }
        outcome?;
        released?;
        Ok(self.report)
    }

    async fn collect(&mut self) -> Result<(), RetentionError> {
        self.report.versioning = if !self.objects.is_s3() {
            "not a bucket".into()
        } else {
            match self.objects.versioning().await {
                Ok(Some(status)) => status,
                Ok(None) => "off".into(),
                // Only a report: some servers do not implement it.
                Err(e) => format!("unknown ({})", error_chain(&e)),
            }
        };
        // Mark.
        let pinned = self.pinned().await?;
        let remembered = self
            .policy
            .memo
            .as_deref()
            .map(memo::load)
            .unwrap_or_default();
        let known = remembered
            .into_iter()
            .map(|(hash, r)| {
                let listed = Listed {
                    entry: ObjectEntry {
                        key: format!("{hash}.narinfo"),
                        size: 0,
                        modified: None,
                        etag: Some(r.etag.clone()),
                    },
                    node: r.node(),
                    deriver: r.deriver,
                    file_size: r.file_size,
                };
                (hash, listed)
            })
            .collect();
        let narinfos = self.read_narinfos(known).await?;
        self.remember(&narinfos);
        let (kept, _) = self.sessions().await?;
        let dead = self.dead(&narinfos, &pinned, &kept);
        self.report.narinfos = narinfos.len();
        self.report.live = narinfos.len() - dead.len();
        self.report.dead = dead.len();
        self.report.dead_nar_bytes = dead.iter().map(|h| narinfos[h].file_size).sum();
        if let Some(max) = self.policy.max_delete
            && !max.allows(dead.len() as u64, narinfos.len() as u64)
        {
            return Err(RetentionError::TooMuch {
                dead: dead.len(),
                of: narinfos.len(),
                max: format!("{max:?}"),
            });
        }
        if self.policy.dry_run {
            self.nar_garbage(&narinfos, &kept, &dead).await?;
            return Ok(());
        }
        // Announce, then mark again: a pusher that looked before the announcement wrote its
        // session before it, and this listing sees it.
        self.set_phase(Phase::Deleting).await?;
        let mut narinfos = self.read_narinfos(narinfos).await?;
        let pinned = self.pinned().await?;
        let (kept, dropped) = self.sessions().await?;
        let dead: BTreeSet<String> = self
            .dead(&narinfos, &pinned, &kept)
            .intersection(&dead)
            .cloned()
            .collect();
        // Delete, referrers first.
        let nodes: BTreeMap<String, Node> = narinfos
            .iter()
            .map(|(h, l)| (h.clone(), l.node.clone()))
            .collect();
        for layer in plan::deletion_layers(&dead, &nodes) {
            let keys: Vec<String> = layer.iter().map(|h| format!("{h}.narinfo")).collect();
            self.delete_all(keys).await?;
            self.report.deleted_narinfos += layer.len();
        }
        for h in &dead {
            narinfos.remove(h);
        }
        self.remember(&narinfos);
        self.delete_attachments(&narinfos, &dead).await?;
        self.sweep_nars(&narinfos, &kept).await?;
        let dropped: Vec<String> = dropped.into_iter().map(|e| e.key).collect();
        self.report.deleted_sessions = dropped.len();
        self.delete_all(dropped).await?;
        Ok(())
    }

    /// The hash parts of the paths pins keep (those not expired).
    async fn pinned(&mut self) -> Result<BTreeSet<String>, RetentionError> {
        let pins = pins::list(&self.objects).await?;
        self.report.pins = pins.len();
        let now = SystemTime::now();
        let mut pinned = BTreeSet::new();
        for (name, pin) in pins.iter().filter(|(_, p)| !p.expired(now)) {
            pinned.extend(pin.hashes().map_err(|e| CacheError::BadRecord {
                key: format!("{}{name}.json", pins::PINS_PREFIX),
                message: e,
            })?);
        }
        Ok(pinned)
    }

    /// Narinfos no root reaches.
    fn dead(
        &mut self,
        narinfos: &BTreeMap<String, Listed>,
        pinned: &BTreeSet<String>,
        kept: &[Arc<Session>],
    ) -> BTreeSet<String> {
        let fresh_after = self.before_t0(self.policy.keep_within);
        let roots: BTreeSet<&str> = pinned
            .iter()
            .map(String::as_str)
            .chain(kept.iter().flat_map(|s| s.paths.iter().map(String::as_str)))
            .chain(
                narinfos
                    .iter()
                    .filter(|(_, l)| l.entry.modified.is_none_or(|m| m >= fresh_after))
                    .map(|(h, _)| h.as_str()),
            )
            .collect();
        let nodes: BTreeMap<String, Node> = narinfos
            .iter()
            .map(|(h, l)| (h.clone(), l.node.clone()))
            .collect();
        let live = plan::live(roots.iter().copied(), &nodes);
        let mut missing: BTreeSet<String> = BTreeSet::new();
        for h in &live {
            for r in &nodes[h].references {
                if !nodes.contains_key(r) {
                    missing.insert(r.clone());
                }
            }
        }
        self.report.missing_references = missing.into_iter().collect();
        nodes
            .keys()
            .filter(|h| !live.contains(*h))
            .cloned()
            .collect()
    }

    /// Every session, split into those the policy keeps (read) and those it drops.
    async fn sessions(&mut self) -> Result<(Vec<Arc<Session>>, Vec<ObjectEntry>), RetentionError> {
        let entries = self.objects.list(SESSIONS_PREFIX, false).await?;
        self.report.sessions = entries.len();
        let fresh_after = self.before_t0(self.policy.keep_within);
        let mut by_host: BTreeMap<&str, Vec<&ObjectEntry>> = BTreeMap::new();
        for e in &entries {
            by_host
                .entry(Session::host_of(&e.key).unwrap_or(""))
                .or_default()
                .push(e);
        }
        let mut keep: BTreeSet<&str> = entries
            .iter()
            .filter(|e| e.modified.is_none_or(|m| m >= fresh_after))
            .map(|e| e.key.as_str())
            .collect();
        if let Some(n) = self.policy.keep_last {
            for list in by_host.values_mut() {
                list.sort_by(|a, b| b.modified.cmp(&a.modified).then(b.key.cmp(&a.key)));
                keep.extend(list.iter().take(n).map(|e| e.key.as_str()));
            }
        }
        // A session listed with the version an earlier mark read holds what it held then: the
        // second mark's listing still sees every session written before the announcement, and
        // whatever a pusher added since changed the version. Where the server lists no entity
        // tag, the size tells: a session is always written whole and only ever grows (see
        // `SessionRecord` in nixpush_cache), so new content is a longer object.
        let mut kept = Vec::new();
        let mut to_read = Vec::new();
        for e in entries.iter().filter(|e| keep.contains(e.key.as_str())) {
            let version = tag(e);
            match (self.sessions_seen.get(&e.key), &version) {
                (Some((seen, session)), Some(now)) if seen == now => kept.push(session.clone()),
                _ => to_read.push((e.key.clone(), version)),
            }
        }
        let versions: HashMap<String, Option<String>> = to_read.iter().cloned().collect();
        self.report.sessions_read += to_read.len();
        let bodies = self
            .get_all(to_read.into_iter().map(|(k, _)| k).collect())
            .await?;
        for (key, body) in bodies {
            let Some(body) = body else { continue };
            let session: Arc<Session> = serde_json::from_slice::<Session>(&body)
                .map_err(|e| CacheError::BadRecord {
                    key: key.clone(),
                    message: e.to_string(),
                })?
                .into();
            if let Some(Some(version)) = versions.get(&key) {
                self.sessions_seen
                    .insert(key, (version.clone(), session.clone()));
            }
            kept.push(session);
        }
        self.report.sessions_kept = kept.len();
        let dropped = entries
            .iter()
            .filter(|e| !keep.contains(e.key.as_str()))
            .cloned()
            .collect();
        Ok((kept, dropped))
    }

    /// Lists the narinfos and reads those not in `known` with the same entity tag. A narinfo
    /// deleted between the listing and its read is passed over; any other failure aborts the run.
    async fn read_narinfos(
        &mut self,
        mut known: BTreeMap<String, Listed>,
    ) -> Result<BTreeMap<String, Listed>, RetentionError> {
        let listed: Vec<ObjectEntry> = self
            .objects
            .list_hashed("", true)
            .await?
            .into_iter()
            .filter(|e| e.key.ends_with(".narinfo") && !e.key.contains('/'))
            .collect();
        let mut out = BTreeMap::new();
        let mut to_read = Vec::new();
        for entry in listed {
            let hash = entry.key.trim_end_matches(".narinfo").to_owned();
            match known.remove(&hash) {
                Some(l) if tag(&entry).is_some() && tag(&l.entry) == tag(&entry) => {
                    out.insert(hash, Listed { entry, ..l });
                }
                _ => to_read.push(entry),
            }
        }
        let keys: Vec<String> = to_read.iter().map(|e| e.key.clone()).collect();
        self.report.narinfos_read += keys.len();
        let bodies: HashMap<String, Option<Vec<u8>>> =
            self.get_all(keys).await?.into_iter().collect();
        for entry in to_read {
            let Some(Some(body)) = bodies.get(&entry.key) else {
                continue;
            };
            let bad = |message: String| CacheError::BadRecord {
                key: entry.key.clone(),
                message,
            };
            let text = std::str::from_utf8(body).map_err(|e| bad(e.to_string()))?;
            let info: NarInfo = text.parse().map_err(|e| bad(format!("{e}")))?;
            let hash = entry.key.trim_end_matches(".narinfo").to_owned();
            let node = Node {
                references: info
                    .references
                    .iter()
                    .map(|r| r.hash_part().to_owned())
                    .filter(|r| *r != hash)
                    .collect(),
                nar: info.url.clone(),
            };
            out.insert(
                hash,
                Listed {
                    entry,
                    node,
                    deriver: info.deriver.map(|d| d.base_name().to_owned()),
                    file_size: info.file_size.unwrap_or_default(),
                },
            );
        }
        Ok(out)
    }

    /// Saves what was read of `narinfos` for the next run.
    fn remember(&self, narinfos: &BTreeMap<String, Listed>) {
        let Some(path) = &self.policy.memo else {
            return;
        };
        let memo = narinfos
            .iter()
            .filter_map(|(hash, l)| {
                let remembered = memo::Remembered {
                    etag: tag(&l.entry)?,
                    references: l.node.references.clone(),
                    nar: l.node.nar.clone(),
                    deriver: l.deriver.clone(),
                    file_size: l.file_size,
                };
                Some((hash.clone(), remembered))
            })
            .collect();
        memo::save(path, &memo);
    }

    /// `t0` less `d`, or the epoch.
    fn before_t0(&self, d: Duration) -> SystemTime {
        self.t0.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }

    /// `.ls` listings and build logs whose owners are gone: a listing with its narinfo, a log
    /// when no surviving narinfo names its derivation and it is older than `keep-within` (the log
    /// of a failed build has no owner, and is kept that long).
    async fn delete_attachments(
        &mut self,
        survivors: &BTreeMap<String, Listed>,
        dead: &BTreeSet<String>,
    ) -> Result<(), RetentionError> {
        let listings: Vec<String> = self
            .objects
            .list_hashed("", true)
            .await?
            .into_iter()
            .filter_map(|e| {
                let hash = e.key.strip_suffix(".ls")?;
                dead.contains(hash).then(|| e.key.clone())
            })
            .collect();
        self.delete_all(listings).await?;
        let owners: BTreeSet<&str> = survivors
            .values()
            .filter_map(|l| l.deriver.as_deref())
            .collect();
        let old = self.before_t0(self.policy.keep_within);
        let logs: Vec<String> = self
            .objects
            .list("log/", false)
            .await?
            .into_iter()
            .filter(|e| {
                let drv = e.key.trim_start_matches("log/");
                !owners.contains(drv) && e.modified.is_some_and(|m| m < old)
            })
            .map(|e| e.key)
            .collect();
        self.report.logs_garbage = logs.len();
        self.report.deleted_logs = logs.len();
        self.delete_all(logs).await
    }

    /// The NARs no narinfo needs: none of the narinfos listed now (`read`: as last read) points to
    /// them, no kept session relied on them, and they were not written within the window a pusher
    /// may take between a NAR and its narinfo. `planned`: narinfos a dry run would have deleted,
    /// still listed. Returns them.
    async fn nar_garbage(
        &mut self,
        read: &BTreeMap<String, Listed>,
        kept: &[Arc<Session>],
        planned: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, RetentionError> {
        let mut now_listed = self.read_narinfos(read.clone()).await?;
        now_listed.retain(|h, _| !planned.contains(h));
        let nars = self.objects.list_hashed("nar/", false).await?;
        self.report.nars = nars.len();
        let young = self.before_t0(NAR_WINDOW + CLOCK_SKEW);
        let protected: BTreeSet<String> = kept
            .iter()
            .flat_map(|s| s.nars.iter().cloned())
            .chain(
                nars.iter()
                    .filter(|n| n.modified.is_none_or(|m| m >= young))
                    .map(|n| n.key.clone()),
            )
            .collect();
        let garbage = plan::nar_garbage(
            nars.iter().map(|n| n.key.as_str()),
            now_listed.values().map(|l| &l.node),
            &protected,
        );
        let sizes: HashMap<&str, u64> = nars.iter().map(|n| (n.key.as_str(), n.size)).collect();
        self.report.nar_garbage = garbage.len();
        self.report.nar_garbage_bytes = garbage.iter().map(|k| sizes[k.as_str()]).sum();
        Ok(garbage)
    }

    /// Records the NAR garbage as orphans, with since when, and deletes those orphaned for the
    /// NAR grace.
    async fn sweep_nars(
        &mut self,
        survivors: &BTreeMap<String, Listed>,
        kept: &[Arc<Session>],
    ) -> Result<(), RetentionError> {
        let garbage = self.nar_garbage(survivors, kept, &BTreeSet::new()).await?;
        let t0 = self.report.t0;
        let before: BTreeMap<String, u64> = match self.objects.get(ORPHANS_KEY).await? {
            Some(body) => serde_json::from_slice(&body).map_err(|e| CacheError::BadRecord {
                key: ORPHANS_KEY.to_owned(),
                message: e.to_string(),
            })?,
            None => BTreeMap::new(),
        };
        let grace = self.policy.nar_grace.as_secs();
        let mut waiting = BTreeMap::new();
        let mut due = Vec::new();
        for key in garbage {
            let since = before.get(&key).copied().unwrap_or(t0);
            if since + grace <= t0 {
                due.push(key);
            } else {
                waiting.insert(key, since);
            }
        }
        self.report.nars_in_grace = waiting.len();
        let body = serde_json::to_vec(&waiting).expect("orphans serialize");
        self.objects.put(ORPHANS_KEY, body, JSON).await?;
        self.report.deleted_nars = due.len();
        self.delete_all(due).await
    }

    /// Reads `keys`, [`IN_FLIGHT`] at a time (only that many requests exist at once: a task per
    /// key up front held a few KiB each, hundreds of MiB for a large cache), renewing the lease as
    /// it goes.
    async fn get_all(
        &mut self,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, RetentionError> {
        let mut keys = keys.into_iter();
        let mut tasks = tokio::task::JoinSet::new();
        let mut out = Vec::new();
        loop {
            while tasks.len() < IN_FLIGHT {
                let Some(key) = keys.next() else { break };
                let objects = self.objects.clone();
                tasks.spawn(async move {
                    let body = objects.get(&key).await;
                    (key, body)
                });
            }
            let Some(done) = tasks.join_next().await else {
                return Ok(out);
            };
            let (key, body) = done.map_err(|e| RetentionError::Panicked(e.to_string()))?;
            out.push((key, body?));
            if out.len() % 256 == 0 {
                self.keep_lease().await?;
            }
        }
    }

    /// Deletes `keys`, a batch of [`DELETE_BATCH`] a request and [`BATCHES_IN_FLIGHT`] requests
    /// at once, renewing the lease between rounds; stops (with an error) when the lease could not
    /// be kept, since pushers then count the run as ended. The order of `keys` is kept between
    /// rounds: a caller that needs one set gone before another calls twice.
    async fn delete_all(&mut self, keys: Vec<String>) -> Result<(), RetentionError> {
        for round in keys.chunks(DELETE_BATCH * BATCHES_IN_FLIGHT) {
            self.keep_lease().await?;
            let mut tasks = tokio::task::JoinSet::new();
            for batch in round.chunks(DELETE_BATCH) {
                let (objects, batch) = (self.objects.clone(), batch.to_vec());
                tasks.spawn(async move { objects.delete_many(&batch).await });
            }
            let deleted = tokio::time::timeout_at(self.lease_end(), async {
                while let Some(done) = tasks.join_next().await {
                    done.map_err(|e| RetentionError::Panicked(e.to_string()))??;
                }
                Ok::<(), RetentionError>(())
            })
            .await;
            match deleted {
                Ok(result) => result?,
                Err(_) => {
                    tasks.abort_all();
                    return Err(RetentionError::LeaseLost);
                }
            }
        }
        Ok(())
    }

    /// Writes the state with `phase` (a new phase takes the next sequence number; the same phase
    /// renews the lease), on the condition that nobody else wrote it since. Never once the lease
    /// is gone: pushers may count the run as ended by then.
    async fn set_phase(&mut self, phase: Phase) -> Result<(), RetentionError> {
        self.check_lease()?;
        let mut state = self.state.clone();
        if phase != state.phase {
            state.seq += 1;
            state.phase = phase;
        }
        let expect = Expect::Etag(self.etag.clone().ok_or(RetentionError::NoEtag)?);
        let sent = Instant::now();
        let etag = write_state(&self.objects, &state, &expect, self.policy.single_runner).await?;
        self.state = state;
        self.renewed = sent;
        self.etag = match etag {
            Some(etag) => Some(etag),
            None => self.objects.head(STATE_KEY).await?.and_then(|e| e.etag),
        };
        Ok(())
    }

    /// Renews the lease if it was last renewed [`RENEW_EVERY`] ago; fails once it is gone.
    async fn keep_lease(&mut self) -> Result<(), RetentionError> {
        if self.policy.dry_run {
            return Ok(());
        }
        if self.renewed.elapsed() >= RENEW_EVERY {
            self.set_phase(self.state.phase).await?;
        }
        self.check_lease()
    }

    fn check_lease(&self) -> Result<(), RetentionError> {
        if self.renewed.elapsed() >= LEASE - LEASE_MARGIN {
            return Err(RetentionError::LeaseLost);
        }
        Ok(())
    }

    /// When the lease ends, as this process measures it.
    fn lease_end(&self) -> tokio::time::Instant {
        (self.renewed + (LEASE - LEASE_MARGIN)).into()
    }
}

/// Writes the collector's state on `expect` (unconditionally for a single runner); returns the
/// new entity tag if the server gave one. A refusal that finds the state as this write would have
/// left it (the SDK retried a write that had landed) is the write's success.
async fn write_state(
    objects: &Objects,
    state: &GcState,
    expect: &Expect,
    single_runner: bool,
) -> Result<Option<String>, RetentionError> {
    let body = serde_json::to_vec(state).expect("the state serializes");
    if single_runner {
        objects.put(STATE_KEY, body, JSON).await?;
        return Ok(None);
    }
    match objects.put_if(STATE_KEY, body, JSON, expect).await? {
        Conditional::Written(etag) => Ok(etag),
        Conditional::Refused => match read_state(objects).await? {
            (Some(now), _) if now == *state => Ok(None),
            _ => Err(RetentionError::Raced),
        },
    }
}

/// What tells one version of an object from another: its entity tag, or where a server lists
/// none (s3s-fs), its size and time.
fn tag(entry: &ObjectEntry) -> Option<String> {
    entry.etag.clone().or_else(|| {
        let secs = entry.modified?.duration_since(UNIX_EPOCH).ok()?;
        Some(format!(
            "{}@{}.{:09}",
            entry.size,
            secs.as_secs(),
            secs.subsec_nanos()
        ))
    })
}

async fn read_state(
    objects: &Objects,
) -> Result<(Option<GcState>, Option<ObjectEntry>), RetentionError> {
    let Some(entry) = objects.head(STATE_KEY).await? else {
        return Ok((None, None));
    };
    let Some(body) = objects.get(STATE_KEY).await? else {
        return Ok((None, None));
    };
    let state = serde_json::from_slice(&body).map_err(|e| CacheError::BadRecord {
        key: STATE_KEY.to_owned(),
        message: e.to_string(),
    })?;
    Ok((Some(state), Some(entry)))
}

/// Conditional writes that must be refused, on a scratch key: a server that lets either through
/// ignores conditions, and two collections could then run at once.
async fn check_conditional_writes(objects: &Objects, run: &str) -> Result<(), RetentionError> {
    let key = format!("nixpush/gc/probe-{run}");
    let body = || b"probe".to_vec();
    let first = objects.put_if(&key, body(), JSON, &Expect::Absent).await?;
    let again = objects.put_if(&key, body(), JSON, &Expect::Absent).await;
    let stale = objects
        .put_if(
            &key,
            body(),
            JSON,
            &Expect::Etag("\"0-not-this-one\"".into()),
        )
        .await;
    objects.delete(&key).await?;
    match (first, again?, stale?) {
        (Conditional::Written(_), Conditional::Refused, Conditional::Refused) => Ok(()),
        _ => Err(RetentionError::NoConditionalWrites),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixpush_cache::StoreUrl;

    async fn write(objects: &Objects, key: &str, paths: &[&str]) {
        let session = Session {
            host: "builder".into(),
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            nars: Vec::new(),
        };
        let body = serde_json::to_vec(&session).unwrap();
        objects.put(key, body, "application/json").await.unwrap();
    }

    /// A later mark of one run reads again the sessions written since the last, and only those:
    /// what it keeps is what they hold now.
    #[tokio::test]
    async fn a_later_mark_reads_again_only_the_sessions_written_since() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        let url: StoreUrl = format!("file://{}", cache.display()).parse().unwrap();
        let objects = Objects::open(&url, None).await.unwrap();
        let (one, two) = (Session::key("builder", 1, 1), Session::key("builder", 2, 2));
        write(&objects, &one, &["a"]).await;
        write(&objects, &two, &["x"]).await;
        let policy = Policy {
            keep_within: Duration::from_secs(3600),
            keep_last: None,
            nar_grace: Duration::ZERO,
            max_delete: None,
            dry_run: false,
            single_runner: true,
            memo: None,
        };
        let mut c = Collector::begin(objects.clone(), policy, "collector")
            .await
            .unwrap();
        let (kept, _) = c.sessions().await.unwrap();
        assert_eq!((kept.len(), c.report.sessions_read), (2, 2));
        write(&objects, &one, &["a", "b"]).await;
        let (kept, _) = c.sessions().await.unwrap();
        assert_eq!(c.report.sessions_read, 3, "only the session written again");
        let mut paths: Vec<Vec<String>> = kept.iter().map(|s| s.paths.clone()).collect();
        paths.sort();
        assert_eq!(paths, [vec!["a", "b"], vec!["x"]]);
    }
}
