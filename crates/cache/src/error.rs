use std::path::PathBuf;

use nixpush_format::{Sha256, StorePath};
use thiserror::Error;

use crate::UrlError;

#[derive(Debug, Error)]
pub enum CacheError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("cannot reach the S3 endpoint {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error(
        "no AWS credentials found ({message}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or name a profile with `profile=`"
    )]
    NoCredentials { message: String },
    #[error(
        "access denied to bucket `{bucket}` ({code}): check the credentials and the bucket policy"
    )]
    AccessDenied { bucket: String, code: String },
    #[error(
        "bucket `{bucket}` is in region `{actual}`, not `{configured}`: set region={actual} in the store URL"
    )]
    WrongRegion {
        bucket: String,
        configured: String,
        actual: String,
    },
    #[error("the server refused bucket `{bucket}` (HTTP 400); S3 bucket names are {rule}")]
    BadBucketName { bucket: String, rule: &'static str },
    #[error("bucket `{bucket}` does not exist at {endpoint}")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error("S3 is throttling requests ({code}) on {key}")]
    Throttled {
        key: String,
        code: String,
        retry_after: Option<u64>,
    },
    #[error("S3 {operation} of {key} failed{}", outcome(*status, message))]
    S3 {
        operation: &'static str,
        key: String,
        /// The server's code and message; empty when its answer had none (a HEAD has no body).
        message: String,
        status: Option<u16>,
    },
    #[error("{operation} {} failed", path.display())]
    File {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object key {key:?} points outside the cache directory {}", dir.display())]
    KeyOutsideCache { key: String, dir: PathBuf },
    #[error("cannot write the NAR spool file in {}", dir.display())]
    Spool {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the spool file {} changed after it was written: it holds {actual_size} bytes with hash \
         {actual_hash}, not the {expected_size} bytes with hash {expected_hash} that name the NAR \
         (a failing disk, or another process writing in the spool directory)", path.display()
    )]
    SpoolChanged {
        path: PathBuf,
        expected_hash: Sha256,
        expected_size: u64,
        actual_hash: Sha256,
        actual_size: u64,
    },
    #[error("reading {path} from the store failed: {message}")]
    Source { path: StorePath, message: String },
    #[error(
        "refusing to upload {path}: its NAR has hash {actual_hash} and size {actual_size}, but the store \
         recorded {recorded_hash} and {recorded_size} (the store path is corrupt; see `nix-store --verify --check-contents`)"
    )]
    NarMismatch {
        path: StorePath,
        recorded_hash: Sha256,
        recorded_size: u64,
        actual_hash: Sha256,
        actual_size: u64,
    },
    #[error("not publishing {path}: its reference {reference} could not be published")]
    ReferenceFailed {
        path: StorePath,
        reference: StorePath,
    },
    #[error(
        "not publishing {path} yet: its reference {reference} is no longer known to be in the \
         cache; the next attempt checks it"
    )]
    ReferenceForgotten {
        path: StorePath,
        reference: StorePath,
    },
    #[error("the upload of {path} was abandoned: the push that had it in hand was cancelled")]
    Abandoned { path: StorePath },
    #[error(
        "{url} answered HTTP {status}: the cache refuses anonymous reads (nixpush reads http(s) \
         caches without credentials; use the s3:// URL with credentials instead)"
    )]
    HttpDenied { url: String, status: u16 },
    #[error("HTTP request for {url} failed: {message}")]
    Http { url: String, message: String },
    #[error("{url} is read-only for nixpush: it writes to s3:// and file:// caches")]
    ReadOnly { url: String },
    #[error("{url} cannot be listed: --all needs an s3:// or file:// cache")]
    NotListable { url: String },
    #[error(
        "the cache's nix-cache-info says StoreDir {found:?}, but nixpush writes for {expected:?}"
    )]
    StoreDirMismatch { found: String, expected: String },
    #[error("the cache directory {} does not exist", dir.display())]
    NoCacheDirectory { dir: PathBuf },
    #[error("{key} in the cache is not what nixpush wrote there: {message}")]
    BadRecord { key: String, message: String },
    #[error(
        "a collection (`nixpush gc`, run {run}) is deleting from the cache; waited {waited_s} s for it \
         to end"
    )]
    CollectionDeleting { run: String, waited_s: u64 },
}

/// "outer: inner: innermost", the way errors are shown everywhere in nixpush.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let msg = inner.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = inner.source();
    }
    s
}

/// How an S3 request ended: the status an operator looks up, beside the server's own words.
fn outcome(status: Option<u16>, message: &str) -> String {
    match (status, message) {
        (Some(s), "") => format!(" with HTTP {s} and no error code"),
        (Some(s), m) => format!(" (HTTP {s}): {m}"),
        (None, m) => format!(": {m}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_s3_failure_names_its_status_and_the_servers_words() {
        let e = |status, message: &str| {
            CacheError::S3 {
                operation: "GET",
                key: "k.narinfo".into(),
                message: message.into(),
                status,
            }
            .to_string()
        };
        assert_eq!(
            e(Some(500), "InternalError: try again"),
            "S3 GET of k.narinfo failed (HTTP 500): InternalError: try again"
        );
        assert_eq!(
            e(Some(400), ""),
            "S3 GET of k.narinfo failed with HTTP 400 and no error code"
        );
        assert_eq!(
            e(None, "connection closed"),
            "S3 GET of k.narinfo failed: connection closed"
        );
    }
}
