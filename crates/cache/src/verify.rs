//! Auditing a binary cache the way a careful client would: every narinfo parses, is signed by a
//! trusted key, points at a NAR object whose bytes match FileSize/FileHash, which decompresses to a
//! well-formed NAR matching NarSize/NarHash, and every reference has a narinfo too.
//!
//! Nothing here writes to the cache. NARs stream through hashing, decompression and the NAR reader
//! on a blocking thread, fed through a bounded channel, so memory does not grow with NAR size. A NAR
//! object shared by several narinfos is read once.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use nixpush_format::cache_keys::{NIX_CACHE_INFO, narinfo_key};
use nixpush_format::hash::HashCounter;
use nixpush_format::nar::{Limits, read_nar};
use nixpush_format::store_path::STORE_DIR;
use nixpush_format::{Compression, NarInfo, PublicKey, Sha256, StorePath};
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

/// What a problem is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Path(StorePath),
    /// A cache object with no store path to name: a NAR, an unparsable narinfo, an upload.
    Object(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Path(p) => write!(f, "{p}"),
            Subject::Object(k) => f.write_str(k),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    CacheInfoMissing,
    StoreDirMismatch {
        found: String,
    },
    /// A path asked for has no narinfo.
    NotInCache,
    NarInfoInvalid {
        message: String,
    },
    /// The narinfo stored under a path's hash describes another path.
    NarInfoWrongPath {
        found: StorePath,
    },
    Unsigned,
    /// Signed, but by no trusted key.
    UntrustedSignatures {
        keys: Vec<String>,
    },
    /// A signature names a trusted key but does not verify.
    BadSignature {
        key: String,
    },
    NarMissing {
        url: String,
    },
    FileSizeMismatch {
        url: String,
        actual: u64,
        expected: u64,
    },
    FileHashMismatch {
        url: String,
        actual: Sha256,
        expected: Sha256,
    },
    UnsupportedCompression {
        compression: String,
    },
    Decompression {
        url: String,
        compression: Compression,
        message: String,
    },
    NarMalformed {
        url: String,
        message: String,
    },
    TrailingData {
        url: String,
        bytes: u64,
    },
    NarSizeMismatch {
        actual: u64,
        expected: u64,
    },
    NarHashMismatch {
        actual: Sha256,
        expected: Sha256,
    },
    ReferenceMissing {
        reference: StorePath,
    },
    OrphanNar {
        size: u64,
    },
    IncompleteUpload {
        detail: String,
    },
    /// The check itself could not run (the object could not be read); says nothing either way.
    Unreadable {
        key: String,
        message: String,
    },
}

impl Problem {
    /// A stable name for machine-readable output.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::CacheInfoMissing => "cache_info_missing",
            Problem::StoreDirMismatch { .. } => "store_dir_mismatch",
            Problem::NotInCache => "not_in_cache",
            Problem::NarInfoInvalid { .. } => "narinfo_invalid",
            Problem::NarInfoWrongPath { .. } => "narinfo_wrong_path",
            Problem::Unsigned => "unsigned",
            Problem::UntrustedSignatures { .. } => "untrusted_signatures",
            Problem::BadSignature { .. } => "bad_signature",
            Problem::NarMissing { .. } => "nar_missing",
            Problem::FileSizeMismatch { .. } => "file_size_mismatch",
            Problem::FileHashMismatch { .. } => "file_hash_mismatch",
            Problem::UnsupportedCompression { .. } => "unsupported_compression",
            Problem::Decompression { .. } => "decompression_failed",
            Problem::NarMalformed { .. } => "nar_malformed",
            Problem::TrailingData { .. } => "trailing_data",
            Problem::NarSizeMismatch { .. } => "nar_size_mismatch",
            Problem::NarHashMismatch { .. } => "nar_hash_mismatch",
            Problem::ReferenceMissing { .. } => "reference_missing",
            Problem::OrphanNar { .. } => "orphan_nar",
            Problem::IncompleteUpload { .. } => "incomplete_upload",
            Problem::Unreadable { .. } => "unreadable",
        }
    }

    /// True when the cache is known to be wrong; false when the check could not be made.
    pub fn is_defect(&self) -> bool {
        !matches!(self, Problem::Unreadable { .. })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::CacheInfoMissing => {
                f.write_str("missing: clients refuse a cache without nix-cache-info")
            }
            Problem::StoreDirMismatch { found } => write!(
                f,
                "StoreDir is {found:?}, not {STORE_DIR:?}: clients of this store cannot use the cache"
            ),
            Problem::NotInCache => f.write_str("not in the cache (no narinfo)"),
            Problem::NarInfoInvalid { message } => write!(f, "narinfo does not parse: {message}"),
            Problem::NarInfoWrongPath { found } => {
                write!(
                    f,
                    "narinfo describes {found}, not the path its name stands for"
                )
            }
            Problem::Unsigned => f.write_str("narinfo has no signatures"),
            Problem::UntrustedSignatures { keys } => write!(
                f,
                "no trusted signature: signed only by {}",
                keys.join(", ")
            ),
            Problem::BadSignature { key } => write!(
                f,
                "signature by {key} does not verify (the narinfo was changed after signing, or the \
                 signature is corrupt)"
            ),
            Problem::NarMissing { url } => write!(f, "NAR object {url} is missing"),
            Problem::FileSizeMismatch {
                url,
                actual,
                expected,
            } if actual < expected => write!(
                f,
                "NAR object {url} is truncated: {actual} bytes, narinfo FileSize says {expected}"
            ),
            Problem::FileSizeMismatch {
                url,
                actual,
                expected,
            } => write!(
                f,
                "NAR object {url} is {actual} bytes, longer than narinfo FileSize {expected}"
            ),
            Problem::FileHashMismatch {
                url,
                actual,
                expected,
            } => write!(
                f,
                "NAR object {url} is corrupt: its hash is {actual}, narinfo FileHash says {expected}"
            ),
            Problem::UnsupportedCompression { compression } => write!(
                f,
                "NAR compression {compression:?} cannot be checked (nixpush reads xz, zstd and none)"
            ),
            Problem::Decompression {
                url,
                compression,
                message,
            } => write!(
                f,
                "NAR object {url} does not decompress as {}: {message}",
                compression.as_str()
            ),
            Problem::NarMalformed { url, message } => {
                write!(f, "NAR in {url} is malformed: {message}")
            }
            Problem::TrailingData { url, bytes } => {
                write!(
                    f,
                    "NAR in {url} is followed by {bytes} bytes of trailing data"
                )
            }
            Problem::NarSizeMismatch { actual, expected } => {
                write!(f, "NAR is {actual} bytes, narinfo NarSize says {expected}")
            }
            Problem::NarHashMismatch { actual, expected } => {
                write!(f, "NAR hash is {actual}, narinfo NarHash says {expected}")
            }
            Problem::ReferenceMissing { reference } => {
                write!(
                    f,
                    "reference {reference} has no narinfo: the closure is incomplete"
                )
            }
            Problem::OrphanNar { size } => {
                write!(f, "orphan NAR ({size} bytes): no narinfo points to it")
            }
            Problem::IncompleteUpload { detail } => {
                write!(f, "incomplete upload ({detail}); nothing was deleted")
            }
            Problem::Unreadable { key, message } => {
                write!(f, "could not check: reading {key} failed: {message}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub subject: Subject,
    pub problem: Problem,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.problem)
    }
}

/// Reported while verification runs, in the order things happen.
#[derive(Debug)]
pub enum VerifyEvent<'a> {
    /// More narinfos are known to need checking (the total grows as closures are followed).
    Queued(u64),
    /// A narinfo was checked; its problems, if any, were reported before this.
    Checked {
        subject: &'a Subject,
        signed_by: Option<&'a str>,
        nar_size: u64,
    },
    Problem(&'a Finding),
    /// Something the audit could not look at, which does not make the cache wrong.
    Note(String),
}

#[derive(Debug, Default)]
pub struct VerifySummary {
    pub narinfos: u64,
    /// Distinct NAR objects read, and their bytes as stored and decompressed.
    pub nars: u64,
    pub file_bytes: u64,
    pub nar_bytes: u64,
    /// How many narinfos each trusted key vouched for.
    pub signed_by: BTreeMap<String, u64>,
    /// Paths missing from the cache as expected (an upstream cache serves them), by reason.
    pub upstream: BTreeMap<String, u64>,
    pub findings: Vec<Finding>,
}

impl VerifySummary {
    pub fn defects(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.problem.is_defect())
            .count()
    }

    pub fn unchecked(&self) -> usize {
        self.findings.len() - self.defects()
    }
}

/// What reading one NAR object showed. Shared by every narinfo that points to the object.
#[derive(Debug, Clone)]
enum NarScan {
    Missing,
    Unreadable(String),
    Read {
        file_hash: Sha256,
        file_size: u64,
        decoded: Decoded,
    },
}

#[derive(Debug, Clone)]
enum Decoded {
    /// Compression nixpush cannot decode: only the object's own bytes were checked.
    Skipped,
    Decompression(String),
    Malformed(String),
    Nar {
        hash: Sha256,
        size: u64,
        trailing: u64,
    },
}

/// A reader that hashes and counts what passes, and remembers the first error from below (so a
/// failed download is told apart from a bad NAR).
struct Tap<R> {
    inner: R,
    hash: HashCounter,
    error: Option<String>,
}

impl<R: Read> Tap<R> {
    fn new(inner: R) -> Self {
        Tap {
            inner,
            hash: HashCounter::default(),
            error: None,
        }
    }
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hash.update(&buf[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.error.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
    }
}

/// Reads a whole NAR object: hash and size as stored, then decompressed, validated and hashed.
/// Runs on a blocking thread.
fn scan<R: Read>(reader: R, compression: Option<Compression>) -> NarScan {
    let mut raw = Tap::new(reader);
    let decoded = match compression {
        Some(c) => decode(&mut raw, c),
        None => Decoded::Skipped,
    };
    // Read to the end even after a decoding error: FileSize and FileHash still say whether the
    // object is the one the narinfo describes, which names the fault better.
    let _ = io::copy(&mut raw, &mut io::sink());
    if let Some(e) = raw.error {
        return NarScan::Unreadable(e);
    }
    let (file_hash, file_size) = raw.hash.finish();
    NarScan::Read {
        file_hash,
        file_size,
        decoded,
    }
}

fn decode<R: Read>(raw: &mut R, compression: Compression) -> Decoded {
    let decoder: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(raw),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(raw)),
        Compression::Zstd => match zstd::stream::read::Decoder::new(raw) {
            Ok(d) => Box::new(d),
            Err(e) => return Decoded::Decompression(e.to_string()),
        },
    };
    let mut nar = Tap::new(decoder);
    if let Err(e) = read_nar(&mut nar, &mut (), &Limits::default()) {
        // An error from below the NAR reader is the decompressor's (or the download's, which the
        // caller sees first); anything else is the NAR's own structure.
        return match nar.error.take() {
            Some(below) if compression != Compression::None => Decoded::Decompression(below),
            _ => Decoded::Malformed(e.to_string()),
        };
    }
    let before = nar.hash.clone().finish().1;
    if let Err(e) = io::copy(&mut nar, &mut io::sink()) {
        return Decoded::Decompression(e.to_string());
    }
    let (hash, size) = nar.hash.finish();
    Decoded::Nar {
        hash,
        size,
        trailing: size - before,
    }
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

async fn read_object(target: &Target, url: &str, compression: Option<Compression>) -> NarScan {
    match target.read(url).await {
        Ok(None) => NarScan::Missing,
        Err(e) => NarScan::Unreadable(e.to_string()),
        Ok(Some(reader)) => tokio::task::spawn_blocking(move || scan(reader, compression))
            .await
            .expect("NAR scan panicked"),
    }
}

/// Which trusted key vouches for the narinfo, and what is wrong with its signatures if none does.
fn signatures(info: &NarInfo, trusted: &[PublicKey]) -> (Option<String>, Vec<Problem>) {
    let fingerprint = match info.fingerprint() {
        Ok(f) => f,
        Err(e) => {
            return (
                None,
                vec![Problem::NarInfoInvalid {
                    message: e.to_string(),
                }],
            );
        }
    };
    if let Some(k) = trusted
        .iter()
        .find(|k| info.sigs.iter().any(|s| k.verify(&fingerprint, s)))
    {
        return (Some(k.name().to_owned()), Vec::new());
    }
    if info.sigs.is_empty() {
        return (None, vec![Problem::Unsigned]);
    }
    let bad: Vec<Problem> = info
        .sigs
        .iter()
        .filter(|s| trusted.iter().any(|k| k.name() == s.key_name()))
        .map(|s| Problem::BadSignature {
            key: s.key_name().to_owned(),
        })
        .collect();
    if !bad.is_empty() {
        return (None, bad);
    }
    let keys = info.sigs.iter().map(|s| s.key_name().to_owned()).collect();
    (None, vec![Problem::UntrustedSignatures { keys }])
}

/// Compares what the NAR object turned out to be with what the narinfo says. The first mismatch
/// along the pipeline is the one reported: the later ones follow from it.
fn judge(info: &NarInfo, scan: &NarScan, compression: Option<Compression>) -> Vec<Problem> {
    let url = info.url.clone();
    let (file_hash, file_size, decoded) = match scan {
        NarScan::Missing => return vec![Problem::NarMissing { url }],
        NarScan::Unreadable(message) => {
            return vec![Problem::Unreadable {
                key: url,
                message: message.clone(),
            }];
        }
        NarScan::Read {
            file_hash,
            file_size,
            decoded,
        } => (*file_hash, *file_size, decoded),
    };
    if let Some(expected) = info.file_size
        && expected != file_size
    {
        return vec![Problem::FileSizeMismatch {
            url,
            actual: file_size,
            expected,
        }];
    }
    if let Some(expected) = info.file_hash
        && expected != file_hash
    {
        return vec![Problem::FileHashMismatch {
            url,
            actual: file_hash,
            expected,
        }];
    }
    match decoded {
        Decoded::Skipped => Vec::new(),
        Decoded::Decompression(message) => vec![Problem::Decompression {
            url,
            compression: compression.unwrap_or(Compression::None),
            message: message.clone(),
        }],
        Decoded::Malformed(message) => vec![Problem::NarMalformed {
            url,
            message: message.clone(),
        }],
        Decoded::Nar {
            hash,
            size,
            trailing,
        } => {
            if *trailing > 0 {
                vec![Problem::TrailingData {
                    url,
                    bytes: *trailing,
                }]
            } else if *size != info.nar_size {
                vec![Problem::NarSizeMismatch {
                    actual: *size,
                    expected: info.nar_size,
                }]
            } else if *hash != info.nar_hash {
                vec![Problem::NarHashMismatch {
                    actual: *hash,
                    expected: info.nar_hash,
                }]
            } else {
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use nixpush_format::SecretKey;
    use nixpush_format::nar::{Node, write_node};
    use proptest::prelude::*;

    use super::*;

    fn nar() -> Vec<u8> {
        let tree = Node::Directory(BTreeMap::from([
            (
                b"bin".to_vec(),
                Node::Regular {
                    executable: true,
                    contents: b"#!/bin/sh\necho hi\n".repeat(500),
                },
            ),
            (
                b"link".to_vec(),
                Node::Symlink {
                    target: b"bin".to_vec(),
                },
            ),
        ]));
        let mut out = Vec::new();
        write_node(&tree, &mut out).unwrap();
        out
    }

    fn compress(data: &[u8], c: Compression) -> Vec<u8> {
        match c {
            Compression::None => data.to_vec(),
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    /// A narinfo that describes `nar` stored as `file`.
    fn info_for(nar: &[u8], file: &[u8], c: Compression) -> NarInfo {
        NarInfo {
            store_path: "/nix/store/7h8yvyalwgmvfbkjn2gnd8ackbcqfp2d-x"
                .parse()
                .unwrap(),
            url: format!("nar/x.nar{}", c.extension()),
            compression: c.as_str().to_owned(),
            file_hash: Some(Sha256::digest(file)),
            file_size: Some(file.len() as u64),
            nar_hash: Sha256::digest(nar),
            nar_size: nar.len() as u64,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        }
    }

    fn judge_bytes(info: &NarInfo, stored: &[u8], c: Compression) -> Vec<Problem> {
        judge(info, &scan(stored, Some(c)), Some(c))
    }

    const ALL: [Compression; 3] = [Compression::None, Compression::Xz, Compression::Zstd];

    #[test]
    fn intact_nars_pass_in_every_compression() {
        let nar = nar();
        for c in ALL {
            let file = compress(&nar, c);
            assert_eq!(
                judge_bytes(&info_for(&nar, &file, c), &file, c),
                vec![],
                "{c:?}"
            );
        }
    }

    #[test]
    fn each_fault_is_named_by_its_first_symptom() {
        let nar = nar();
        for c in ALL {
            let file = compress(&nar, c);
            let info = info_for(&nar, &file, c);
            let kinds = |stored: &[u8], info: &NarInfo| -> Vec<&'static str> {
                judge_bytes(info, stored, c)
                    .iter()
                    .map(Problem::kind)
                    .collect()
            };
            assert_eq!(
                kinds(&file[..file.len() - 7], &info),
                ["file_size_mismatch"]
            );
            let mut flipped = file.clone();
            flipped[file.len() / 2] ^= 0x40;
            assert_eq!(kinds(&flipped, &info), ["file_hash_mismatch"]);

            // Without FileHash/FileSize (allowed by the format) the decoder or the NAR reader
            // catches what the hashes would have.
            let mut bare = info.clone();
            bare.file_hash = None;
            bare.file_size = None;
            let truncated = kinds(&file[..file.len() - 7], &bare);
            let expected = if c == Compression::None {
                "nar_malformed"
            } else {
                "decompression_failed"
            };
            assert_eq!(truncated, [expected], "{c:?}");

            let mut wrong = info.clone();
            wrong.nar_hash = Sha256::digest(b"other");
            assert_eq!(kinds(&file, &wrong), ["nar_hash_mismatch"]);
            wrong = info.clone();
            wrong.nar_size += 1;
            assert_eq!(kinds(&file, &wrong), ["nar_size_mismatch"]);
        }
    }

    #[test]
    fn data_after_the_nar_and_non_nars_are_named() {
        let nar = nar();
        let mut longer = nar.clone();
        longer.extend_from_slice(b"trailing");
        let info = info_for(&nar, &longer, Compression::None);
        let p = judge_bytes(&info, &longer, Compression::None);
        assert!(
            matches!(p.as_slice(), [Problem::TrailingData { bytes: 8, .. }]),
            "{p:?}"
        );
        let junk = b"definitely not a NAR".repeat(10);
        let info = info_for(&junk, &junk, Compression::None);
        let p = judge_bytes(&info, &junk, Compression::None);
        assert!(
            matches!(&p[..], [Problem::NarMalformed { message, .. }] if message.contains("not a NAR")),
            "{p:?}"
        );
    }

    /// Fails after `ok` bytes, as a dropped download does.
    struct Broken<'a> {
        data: &'a [u8],
        ok: usize,
    }

    impl Read for Broken<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::other("connection reset"));
            }
            let n = buf.len().min(self.ok).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_failed_download_is_unreadable_not_corrupt() {
        let nar = nar();
        for c in ALL {
            let file = compress(&nar, c);
            let scanned = scan(
                Broken {
                    data: &file,
                    ok: file.len() / 2,
                },
                Some(c),
            );
            let p = judge(&info_for(&nar, &file, c), &scanned, Some(c));
            assert!(
                matches!(&p[..], [Problem::Unreadable { message, .. }] if message.contains("connection reset")),
                "{c:?}: {p:?}"
            );
            assert!(!p[0].is_defect());
        }
    }

    #[test]
    fn signatures_name_the_trusted_key_or_what_is_wrong() {
        let ours = SecretKey::generate("ours-1").unwrap();
        let theirs = SecretKey::generate("theirs-1").unwrap();
        let trusted = vec![ours.public_key()];
        let nar = nar();
        let mut info = info_for(&nar, &nar, Compression::None);
        assert_eq!(signatures(&info, &trusted), (None, vec![Problem::Unsigned]));
        info.sign(&theirs).unwrap();
        assert_eq!(
            signatures(&info, &trusted),
            (
                None,
                vec![Problem::UntrustedSignatures {
                    keys: vec!["theirs-1".into()]
                }]
            )
        );
        info.sign(&ours).unwrap();
        assert_eq!(signatures(&info, &trusted), (Some("ours-1".into()), vec![]));
        // Signed for other contents: the signature no longer matches.
        info.nar_size += 1;
        assert_eq!(
            signatures(&info, &trusted),
            (
                None,
                vec![Problem::BadSignature {
                    key: "ours-1".into()
                }]
            )
        );
    }

    proptest! {
        #[test]
        fn arbitrary_objects_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let nar = nar();
            for c in ALL {
                let p = judge(&info_for(&nar, &nar, c), &scan(&data[..], Some(c)), Some(c));
                prop_assert!(!p.is_empty());
            }
        }
    }
}
