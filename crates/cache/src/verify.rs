//! Auditing a binary cache the way a careful client would: every narinfo parses, is signed by a
//! trusted key, points at a NAR object whose bytes match FileSize/FileHash, which decompresses to a
//! well-formed NAR matching NarSize/NarHash, and every reference has a narinfo too.
//!
//! Nothing here writes to the cache. NARs stream through hashing, decompression and the NAR reader
//! on a blocking thread, fed through a bounded channel, so memory does not grow with NAR size. A NAR
//! object shared by several narinfos is read once.
//!
//! - this module: the walk (closures through the cache's narinfos, or every object), each narinfo
//!   checked once, at most `jobs` at a time;
//! - [`judge`]: one narinfo against its NAR object and the trusted keys;
//! - [`findings`]: what is reported.

mod findings;
mod judge;

pub use findings::{Finding, Problem, Subject, VerifyEvent, VerifySummary};
use judge::{Decoded, NarScan, judge, read_object, signatures};

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use nixpush_format::cache_keys::{NIX_CACHE_INFO, narinfo_key};
use nixpush_format::store_path::STORE_DIR;
use nixpush_format::{Compression, NarInfo, PublicKey, StorePath};
use tokio::sync::OnceCell;
use tokio::task::JoinSet;

use crate::target::Target;
use crate::{CacheError, StoreUrl};

/// What to check.
#[derive(Debug, Clone)]
pub enum Scope {
    /// These paths and everything they reference, followed through the cache's narinfos.
    Closures(Vec<StorePath>),
    /// Every narinfo in the cache, plus NAR objects nothing points to and unfinished uploads.
    All,
}

/// What closure-following knows about a path's narinfo.
enum Known {
    /// Being checked; the paths that reference it, to be told if it turns out missing.
    Pending(Vec<StorePath>),
    Present,
    Missing,
}

/// One narinfo to check: its key, and the path it should describe when known in advance.
struct Item {
    key: String,
    expected: Option<StorePath>,
}

/// What checking one narinfo found.
struct Report {
    item_key: String,
    subject: Subject,
    /// `None` when the narinfo is missing or does not parse.
    info: Option<NarInfo>,
    missing: bool,
    signed_by: Option<String>,
    problems: Vec<Problem>,
    /// Bytes of the NAR object as stored and decompressed, when this check was the one to read it.
    first_read: Option<(u64, u64)>,
}

type NarCells = Mutex<HashMap<String, Arc<OnceCell<NarScan>>>>;

struct Shared {
    target: Target,
    trusted: Vec<PublicKey>,
    nars: NarCells,
    upstream: Option<Upstream>,
}

/// Says why a path missing from the cache is expected to be missing (for example: the local store
/// has it signed by a key whose cache serves it, so `push --skip-signed-by` left it out), or `None`
/// when it should have been there. May block.
pub type Upstream = Box<dyn Fn(&StorePath) -> Option<String> + Send + Sync>;

pub struct Verifier {
    shared: Arc<Shared>,
}

impl Verifier {
    /// Connects without changing anything (a missing directory is an error, not created). A
    /// narinfo passes when a signature by one of `trusted` verifies.
    pub async fn open(url: &StoreUrl, trusted: Vec<PublicKey>) -> Result<Self, CacheError> {
        let target = Target::open_read(url).await?;
        Ok(Verifier {
            shared: Arc::new(Shared {
                target,
                trusted,
                nars: Mutex::new(HashMap::new()),
                upstream: None,
            }),
        })
    }

    /// Accepts the paths `upstream` explains as missing on purpose, instead of reporting them.
    pub fn with_upstream(mut self, upstream: Upstream) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.upstream = Some(upstream);
        }
        self
    }

    /// Why `path` is missing on purpose, if it is (see [`Upstream`]).
    fn expected_missing(&self, path: &StorePath) -> Option<String> {
        let upstream = self.shared.upstream.as_ref()?;
        // The check may ask the local store; the runtime is multi-threaded wherever one is set.
        tokio::task::block_in_place(|| upstream(path))
    }

    /// Runs the audit, checking `jobs` narinfos at once. Problems in the cache are findings in the
    /// summary (and events as they are found); an error means the audit could not run at all (no
    /// access, cannot list).
    pub async fn run(
        &self,
        scope: Scope,
        jobs: usize,
        on_event: &(dyn Fn(VerifyEvent) + Sync),
    ) -> Result<VerifySummary, CacheError> {
        let jobs = jobs.max(1);
        let mut run = Run {
            summary: VerifySummary::default(),
            on_event,
        };
        run.check_cache_info(&self.shared.target).await?;
        match scope {
            Scope::Closures(roots) => self.closures(&mut run, roots, jobs).await,
            Scope::All => self.all(&mut run, jobs).await?,
        }
        Ok(run.summary)
    }

    async fn closures(&self, run: &mut Run<'_>, roots: Vec<StorePath>, jobs: usize) {
        let mut known: HashMap<StorePath, Known> = HashMap::new();
        let mut queue = VecDeque::new();
        for root in roots {
            if known
                .insert(root.clone(), Known::Pending(Vec::new()))
                .is_none()
            {
                queue.push_back(Item {
                    key: narinfo_key(&root),
                    expected: Some(root),
                });
            }
        }
        run.event(VerifyEvent::Queued(queue.len() as u64));
        self.drive(queue, jobs, |report| {
            let Subject::Path(path) = &report.subject else {
                unreachable!("closure items always name their path")
            };
            let upstream = if report.missing {
                self.expected_missing(path)
            } else {
                None
            };
            // A path an upstream cache serves counts as there, for every referrer.
            let state = if report.missing && upstream.is_none() {
                Known::Missing
            } else {
                Known::Present
            };
            let referrers = match known.insert(path.clone(), state) {
                Some(Known::Pending(r)) => r,
                _ => Vec::new(),
            };
            if let Some(why) = upstream {
                *run.summary.upstream.entry(why).or_default() += 1;
                return Vec::new();
            }
            if report.missing {
                // Only roots have no referrers.
                if referrers.is_empty() {
                    run.problem(report.subject.clone(), Problem::NotInCache);
                }
                for r in referrers {
                    run.problem(
                        Subject::Path(r),
                        Problem::ReferenceMissing {
                            reference: path.clone(),
                        },
                    );
                }
                return Vec::new();
            }
            let mut more = Vec::new();
            if let Some(info) = &report.info {
                for r in info.references.iter().filter(|r| **r != info.store_path) {
                    match known.get_mut(r) {
                        Some(Known::Present) => {}
                        Some(Known::Pending(referrers)) => referrers.push(info.store_path.clone()),
                        Some(Known::Missing) => run.problem(
                            Subject::Path(info.store_path.clone()),
                            Problem::ReferenceMissing {
                                reference: r.clone(),
                            },
                        ),
                        None => {
                            known.insert(r.clone(), Known::Pending(vec![info.store_path.clone()]));
                            more.push(Item {
                                key: narinfo_key(r),
                                expected: Some(r.clone()),
                            });
                        }
                    }
                }
            }
            if !more.is_empty() {
                run.event(VerifyEvent::Queued(more.len() as u64));
            }
            run.checked(report);
            more
        })
        .await;
    }

    /// Checks the queued narinfos, `jobs` at once. `handle` sees each report as it comes and
    /// returns more narinfos to check.
    async fn drive(
        &self,
        mut queue: VecDeque<Item>,
        jobs: usize,
        mut handle: impl FnMut(Report) -> Vec<Item>,
    ) {
        let mut running = JoinSet::new();
        loop {
            while running.len() < jobs
                && let Some(item) = queue.pop_front()
            {
                running.spawn(check(self.shared.clone(), item));
            }
            let Some(joined) = running.join_next().await else {
                return;
            };
            queue.extend(handle(joined.expect("narinfo check panicked")));
        }
    }

    async fn all(&self, run: &mut Run<'_>, jobs: usize) -> Result<(), CacheError> {
        let target = &self.shared.target;
        let objects = target.list().await?;
        let mut narinfos = Vec::new();
        let mut hashes = HashSet::new();
        let mut nars = BTreeMap::new();
        for o in objects {
            if let Some(hash) = o.key.strip_suffix(".narinfo").filter(|h| !h.contains('/')) {
                hashes.insert(hash.to_owned());
                narinfos.push(o.key);
            } else if o.key.starts_with("nar/") {
                nars.insert(o.key, o.size);
            }
        }
        narinfos.sort();
        run.event(VerifyEvent::Queued(narinfos.len() as u64));
        let mut pointed_to = HashSet::new();
        let queue = narinfos
            .into_iter()
            .map(|key| Item {
                key,
                expected: None,
            })
            .collect();
        self.drive(queue, jobs, |report| {
            if report.missing {
                // Listed a moment ago, gone now: someone is deleting from the cache meanwhile.
                run.event(VerifyEvent::Note(format!(
                    "{} disappeared while the cache was being verified",
                    report.item_key
                )));
                return Vec::new();
            }
            if let Some(info) = &report.info {
                pointed_to.insert(info.url.clone());
                for r in &info.references {
                    if !hashes.contains(r.hash_part()) {
                        if let Some(why) = self.expected_missing(r) {
                            *run.summary.upstream.entry(why).or_default() += 1;
                            continue;
                        }
                        run.problem(
                            Subject::Path(info.store_path.clone()),
                            Problem::ReferenceMissing {
                                reference: r.clone(),
                            },
                        );
                    }
                }
            }
            run.checked(report);
            Vec::new()
        })
        .await;
        for (key, size) in nars {
            if !pointed_to.contains(&key) {
                run.problem(Subject::Object(key), Problem::OrphanNar { size });
            }
        }
        match target.incomplete_uploads().await {
            Ok(uploads) => {
                for u in uploads {
                    run.problem(
                        Subject::Object(u.key),
                        Problem::IncompleteUpload { detail: u.detail },
                    );
                }
            }
            // Some S3-compatible servers do not implement ListMultipartUploads; the rest of the
            // audit still stands.
            Err(e) => run.event(VerifyEvent::Note(format!(
                "cannot list incomplete uploads: {e}"
            ))),
        }
        Ok(())
    }
}

/// The audit's running state, on the task that drives it (checks run elsewhere and report back).
struct Run<'a> {
    summary: VerifySummary,
    on_event: &'a (dyn Fn(VerifyEvent) + Sync),
}

impl Run<'_> {
    fn event(&self, e: VerifyEvent) {
        (self.on_event)(e)
    }

    fn problem(&mut self, subject: Subject, problem: Problem) {
        let finding = Finding { subject, problem };
        (self.on_event)(VerifyEvent::Problem(&finding));
        self.summary.findings.push(finding);
    }

    fn checked(&mut self, report: Report) {
        self.summary.narinfos += 1;
        for p in report.problems {
            self.problem(report.subject.clone(), p);
        }
        if let Some(key) = &report.signed_by {
            *self.summary.signed_by.entry(key.clone()).or_default() += 1;
        }
        if let Some((file, nar)) = report.first_read {
            self.summary.nars += 1;
            self.summary.file_bytes += file;
            self.summary.nar_bytes += nar;
        }
        (self.on_event)(VerifyEvent::Checked {
            subject: &report.subject,
            signed_by: report.signed_by.as_deref(),
            nar_size: report.info.as_ref().map_or(0, |i| i.nar_size),
        });
    }

    async fn check_cache_info(&mut self, target: &Target) -> Result<(), CacheError> {
        let subject = Subject::Object(NIX_CACHE_INFO.to_owned());
        match target.get(NIX_CACHE_INFO).await? {
            None => self.problem(subject, Problem::CacheInfoMissing),
            Some(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                if let Some(found) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("StoreDir:"))
                    .map(str::trim)
                    .filter(|d| *d != STORE_DIR)
                {
                    self.problem(
                        subject,
                        Problem::StoreDirMismatch {
                            found: found.to_owned(),
                        },
                    );
                }
            }
        }
        Ok(())
    }
}

/// Checks one narinfo and the NAR it points to.
async fn check(shared: Arc<Shared>, item: Item) -> Report {
    let mut report = Report {
        subject: match &item.expected {
            Some(p) => Subject::Path(p.clone()),
            None => Subject::Object(item.key.clone()),
        },
        item_key: item.key.clone(),
        info: None,
        missing: false,
        signed_by: None,
        problems: Vec::new(),
        first_read: None,
    };
    let text = match shared.target.get(&item.key).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            report.missing = true;
            return report;
        }
        Err(e) => {
            report.problems.push(Problem::Unreadable {
                key: item.key,
                message: e.to_string(),
            });
            return report;
        }
    };
    let info: NarInfo = match String::from_utf8(text)
        .map_err(|_| "not UTF-8".to_owned())
        .and_then(|t| {
            t.parse()
                .map_err(|e: nixpush_format::narinfo::NarInfoError| e.to_string())
        }) {
        Ok(info) => info,
        Err(message) => {
            report.problems.push(Problem::NarInfoInvalid { message });
            return report;
        }
    };
    report.subject = Subject::Path(info.store_path.clone());
    let stem = item.key.trim_end_matches(".narinfo");
    if info.store_path.hash_part() != stem
        || item
            .expected
            .as_ref()
            .is_some_and(|e| *e != info.store_path)
    {
        report.problems.push(Problem::NarInfoWrongPath {
            found: info.store_path.clone(),
        });
        // Named by what was asked for (the path, or the object), not by what the file claims.
        report.subject = match &item.expected {
            Some(expected) => Subject::Path(expected.clone()),
            None => Subject::Object(item.key.clone()),
        };
    }
    let (signed_by, sig_problems) = signatures(&info, &shared.trusted);
    report.signed_by = signed_by;
    report.problems.extend(sig_problems);

    let compression = info.compression.parse::<Compression>().ok();
    if compression.is_none() {
        report.problems.push(Problem::UnsupportedCompression {
            compression: info.compression.clone(),
        });
    }
    let cell = shared
        .nars
        .lock()
        .expect("NAR cell map poisoned")
        .entry(format!("{}\n{}", info.url, info.compression))
        .or_default()
        .clone();
    let mut fresh = false;
    let result = cell
        .get_or_init(|| {
            fresh = true;
            read_object(&shared.target, &info.url, compression)
        })
        .await;
    report.problems.extend(judge(&info, result, compression));
    if fresh
        && let NarScan::Read {
            file_size, decoded, ..
        } = result
    {
        let nar = match decoded {
            Decoded::Nar { size, .. } => *size,
            _ => 0,
        };
        report.first_read = Some((*file_size, nar));
    }
    report.info = Some(info);
    report
}
