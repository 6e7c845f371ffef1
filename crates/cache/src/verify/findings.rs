//! What an audit reports: the subject of a problem, the problems it can find (defects, and what it
//! could not check), events as it goes, and the summary.

use std::collections::BTreeMap;
use std::fmt;

use nixpush_format::store_path::STORE_DIR;
use nixpush_format::{Compression, Sha256, StorePath};

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
