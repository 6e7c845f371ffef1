//! Where cache objects live: an S3 bucket, a directory, or (read-only) an HTTP server. Keys are the
//! cache layout's relative names.

use std::io::{self, Read};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use md5::Digest;
use nixpush_format::Sha256;
use nixpush_format::hash::HashCounter;
use tokio::sync::mpsc;

use crate::probe::Page;
use crate::{CacheError, Location, StoreUrl};

mod file;
mod http;
mod s3;

pub(crate) enum Target {
    S3(Box<s3::S3Target>),
    File(file::FileTarget),
    Http(http::HttpTarget),
}

/// Told of every attempt at an S3 request: its operation (`PutObject`, `HeadObject`, …) and how it
/// ended (`2xx` to `5xx` by status class, or `error` when no answer came: a timeout, a reset).
pub type RequestObserver = std::sync::Arc<dyn Fn(&str, &str) + Send + Sync>;

/// An object in a listing: its key, size in bytes, when it was last written (by the server's
/// clock, to the second on S3) and its entity tag (on S3 the server's; for a file, size and
/// modification time), which changes when the object is written anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
    pub etag: Option<String>,
}

/// How a conditional write went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditional {
    /// Written: the new object's entity tag, if the server gave one.
    Written(Option<String>),
    /// The condition did not hold; nothing was written.
    Refused,
}

/// The condition of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Only if no object has the key (`If-None-Match: *`).
    Absent,
    /// Only if the object is still the one with this entity tag (`If-Match`).
    Etag(String),
}

/// An upload that was started and never completed or aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteUpload {
    pub key: String,
    /// What identifies it where it lives: an S3 upload id and start time, or a temporary file.
    pub detail: String,
}

impl Target {
    /// Opens a cache to write to. A directory is created if missing.
    pub async fn open(
        url: &StoreUrl,
        journal: Option<&Path>,
        observer: Option<RequestObserver>,
    ) -> Result<Self, CacheError> {
        let target = Self::open_unchecked(url, journal, observer).await?;
        target.check().await?;
        Ok(target)
    }

    /// [`Target::open`] without the start-up check, for a caller that makes it alongside its
    /// first request (see [`Target::check`]).
    pub(crate) async fn open_unchecked(
        url: &StoreUrl,
        journal: Option<&Path>,
        observer: Option<RequestObserver>,
    ) -> Result<Self, CacheError> {
        Ok(match &url.location {
            Location::S3 { bucket } => Target::S3(Box::new(
                s3::S3Target::open(url, bucket, journal, observer).await?,
            )),
            Location::File { dir } => Target::File(file::FileTarget::create(dir).await?),
            Location::Http { .. } => {
                return Err(CacheError::ReadOnly {
                    url: url.display_base(),
                });
            }
        })
    }

    /// Turns "nothing works" into one precise message before any work starts: on S3, whether the
    /// bucket answers (unreachable, denied, missing, in another region). A directory was checked
    /// when it was opened.
    pub(crate) async fn check(&self) -> Result<(), CacheError> {
        match self {
            Target::S3(t) => t.check_bucket().await,
            Target::File(_) | Target::Http(_) => Ok(()),
        }
    }

    /// Opens a cache to read from, changing nothing: a missing directory is an error.
    pub async fn open_read(url: &StoreUrl) -> Result<Self, CacheError> {
        Self::open_read_observed(url, None).await
    }

    /// Like [`Target::open_read`], telling `observer` of every S3 request.
    pub async fn open_read_observed(
        url: &StoreUrl,
        observer: Option<RequestObserver>,
    ) -> Result<Self, CacheError> {
        let target = match &url.location {
            Location::S3 { bucket } => Target::S3(Box::new(
                s3::S3Target::open(url, bucket, None, observer).await?,
            )),
            Location::File { dir } => Target::File(file::FileTarget::existing(dir).await?),
            Location::Http { base } => Target::Http(http::HttpTarget::open(base)?),
        };
        target.check().await?;
        Ok(target)
    }

    /// Deletes up to 1,000 objects at once (one request on S3); ones already gone are no error.
    pub async fn delete_many(&self, keys: &[String]) -> Result<(), CacheError> {
        match self {
            Target::S3(t) => t.delete_many(keys).await,
            Target::File(t) => {
                for key in keys {
                    t.delete(key).await?;
                }
                Ok(())
            }
            Target::Http(t) => Err(CacheError::ReadOnly {
                url: t.base().to_owned(),
            }),
        }
    }

    /// An S3 bucket's versioning status (`Enabled`, `Suspended`, or `None` if never enabled);
    /// other caches have none.
    pub async fn versioning(&self) -> Result<Option<String>, CacheError> {
        match self {
            Target::S3(t) => t.versioning().await,
            Target::File(_) | Target::Http(_) => Ok(None),
        }
    }

    pub fn is_s3(&self) -> bool {
        matches!(self, Target::S3(_))
    }

    /// Aborts multipart uploads a crash left behind (recorded in the journal).
    pub async fn abort_journaled(&self) -> Result<usize, CacheError> {
        match self {
            Target::S3(t) => t.abort_journaled().await,
            Target::File(_) | Target::Http(_) => Ok(0),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        match self {
            Target::S3(t) => t.exists(key).await,
            Target::File(t) => t.exists(key).await,
            Target::Http(t) => t.exists(key).await,
        }
    }

    /// The size of an object in bytes, or `None` if it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        match self {
            Target::S3(t) => t.size(key).await,
            Target::File(t) => t.size(key).await,
            Target::Http(t) => t.size(key).await,
        }
    }

    /// A whole small object (narinfo, nix-cache-info), or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match self {
            Target::S3(t) => t.get(key).await,
            Target::File(t) => t.get(key).await,
            Target::Http(t) => t.get(key).await,
        }
    }

    /// A whole small object and when it was written (the server's clock), or `None`.
    pub async fn get_dated(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<std::time::SystemTime>)>, CacheError> {
        match self {
            Target::S3(t) => t.get_dated(key).await,
            Target::File(t) => t.get_dated(key).await,
            Target::Http(t) => Ok(t.get(key).await?.map(|b| (b, None))),
        }
    }

    /// An object as a blocking reader with bounded buffering, or `None` if it does not exist. The
    /// reader must be used off the async runtime (in `spawn_blocking`).
    pub async fn read(&self, key: &str) -> Result<Option<ObjectReader>, CacheError> {
        match self {
            Target::S3(t) => t.read(key).await,
            Target::File(t) => t.read(key).await,
            Target::Http(t) => t.read(key).await,
        }
    }

    /// The objects whose keys start with `prefix`; `shallow`: not those below a further `/`.
    pub async fn list_prefix(
        &self,
        prefix: &str,
        shallow: bool,
    ) -> Result<Vec<ObjectEntry>, CacheError> {
        match self {
            Target::S3(t) => t.list_prefix(prefix, shallow).await,
            Target::File(t) => t.list_prefix(prefix, shallow).await,
            Target::Http(t) => Err(CacheError::NotListable {
                url: t.base().to_owned(),
            }),
        }
    }

    /// One page of the shallow listing after `start_after` (see [`crate::probe`]); `None` where
    /// there are no pages to list: a directory answers each question with a `stat`.
    pub(crate) async fn list_page(&self, start_after: &str) -> Result<Option<Page>, CacheError> {
        match self {
            Target::S3(t) => t.list_page(start_after).await.map(Some),
            Target::File(_) | Target::Http(_) => Ok(None),
        }
    }

    /// An object's listing entry, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectEntry>, CacheError> {
        match self {
            Target::S3(t) => t.head(key).await,
            Target::File(t) => t.head(key).await,
            Target::Http(t) => Ok(t.size(key).await?.map(|size| ObjectEntry {
                key: key.to_owned(),
                size,
                modified: None,
                etag: None,
            })),
        }
    }

    /// Deletes an object; one already gone is no error.
    pub async fn delete(&self, key: &str) -> Result<(), CacheError> {
        match self {
            Target::S3(t) => t.delete(key).await,
            Target::File(t) => t.delete(key).await,
            Target::Http(t) => Err(CacheError::ReadOnly {
                url: t.base().to_owned(),
            }),
        }
    }

    /// Writes an object only if `expect` holds, atomically with the check where the server
    /// supports conditional writes (some ignore the condition: see `nixpush gc`).
    pub async fn put_if(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        expect: &Expect,
    ) -> Result<Conditional, CacheError> {
        match self {
            Target::S3(t) => t.put_if(key, body, content_type, expect).await,
            Target::File(t) => t.put_if(key, body, expect).await,
            Target::Http(t) => Err(CacheError::ReadOnly {
                url: t.base().to_owned(),
            }),
        }
    }

    /// Every object in the cache. HTTP caches cannot be listed.
    pub async fn list(&self) -> Result<Vec<ObjectEntry>, CacheError> {
        match self {
            Target::S3(t) => t.list().await,
            Target::File(t) => t.list().await,
            Target::Http(t) => Err(CacheError::NotListable {
                url: t.base().to_owned(),
            }),
        }
    }

    /// Uploads that were started and never finished: S3 multipart uploads, or temporary files in a
    /// directory cache.
    pub async fn incomplete_uploads(&self) -> Result<Vec<IncompleteUpload>, CacheError> {
        match self {
            Target::S3(t) => t.incomplete_uploads().await,
            Target::File(t) => t.incomplete_uploads().await,
            Target::Http(t) => Err(CacheError::NotListable {
                url: t.base().to_owned(),
            }),
        }
    }

    pub async fn put_bytes(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), CacheError> {
        match self {
            Target::S3(t) => t.put_bytes(key, body, content_type).await,
            Target::File(t) => t.put_bytes(key, &body).await,
            Target::Http(t) => Err(CacheError::ReadOnly {
                url: t.base().to_owned(),
            }),
        }
    }

    /// Uploads a local file of `len` bytes whose SHA-256 is `hash` (it names the object), refusing a
    /// file that no longer matches. Atomic for readers: the object appears whole or not at all.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        hash: Sha256,
        content_type: &str,
    ) -> Result<(), CacheError> {
        match self {
            Target::S3(t) => t.put_file(key, path, len, hash, content_type).await,
            Target::File(t) => t.put_file(key, path, len, hash).await,
            Target::Http(t) => Err(CacheError::ReadOnly {
                url: t.base().to_owned(),
            }),
        }
    }
}

/// Base64 of the MD5 of `data`, for `Content-MD5`: the integrity check every S3 server verifies
/// (Nix sends it too), so bytes changed on the way are refused instead of stored.
pub(crate) fn content_md5(data: &[u8]) -> String {
    aws_smithy_types::base64::encode(md5::Md5::digest(data))
}

/// What the server is told about one piece of a spool file, so that it refuses bytes changed on the
/// way: its `Content-MD5` (base64) and its SHA-256 (lowercase hex) for the request's signature.
pub(crate) struct PieceDigest {
    pub md5: String,
    pub sha256: String,
}

/// Reads a spool file once more before it is sent: checks that it still holds the `len` bytes with
/// SHA-256 `hash` that were hashed as it was written, and returns the digests of each
/// `piece`-sized piece of it (the parts of a multipart upload, or the whole file). The server
/// checks each piece against them, so what lands is what was verified here. Blocking.
pub(crate) fn spool_digests(
    path: &Path,
    len: u64,
    hash: Sha256,
    piece: u64,
) -> Result<Vec<PieceDigest>, CacheError> {
    let read_err = |source| CacheError::File {
        operation: "reading the spool file",
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut whole = HashCounter::default();
    let mut digests = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let piece = piece.max(1);
    let (mut md5, mut sha256) = (md5::Md5::new(), HashCounter::default());
    let mut in_piece = 0u64;
    let finish = |md5: md5::Md5, sha256: HashCounter| PieceDigest {
        md5: aws_smithy_types::base64::encode(md5.finalize()),
        sha256: sha256.finish().0.to_base16(),
    };
    loop {
        let want = buf.len().min((piece - in_piece) as usize);
        let n = file.read(&mut buf[..want]).map_err(read_err)?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        md5.update(&buf[..n]);
        sha256.update(&buf[..n]);
        in_piece += n as u64;
        if in_piece == piece {
            let (m, s) = (std::mem::take(&mut md5), std::mem::take(&mut sha256));
            digests.push(finish(m, s));
            in_piece = 0;
        }
    }
    if in_piece > 0 || digests.is_empty() {
        digests.push(finish(md5, sha256));
    }
    let (actual, actual_len) = whole.finish();
    if actual != hash || actual_len != len {
        return Err(CacheError::SpoolChanged {
            path: path.to_owned(),
            expected_hash: hash,
            expected_size: len,
            actual_hash: actual,
            actual_size: actual_len,
        });
    }
    Ok(digests)
}

/// A cache object being read: a local file, or chunks arriving from the network.
pub enum ObjectReader {
    File(std::fs::File),
    Stream(ChunkReader),
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ObjectReader::File(f) => f.read(buf),
            ObjectReader::Stream(s) => s.read(buf),
        }
    }
}

/// Chunks in flight between the network task and the reader. Few: memory must not grow with the
/// object's size when the reader (decompression, hashing) is slower than the network.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Network reads arrive in pieces of a few KiB; handing each to the reader costs a wake-up, so
/// they are gathered into chunks of this size first.
const CHUNK: usize = 256 * 1024;

/// The async end of a download: gathers network reads into chunks for the [`ChunkReader`].
pub(crate) struct ChunkSender {
    tx: mpsc::Sender<Result<Bytes, String>>,
    buf: BytesMut,
}

impl ChunkSender {
    /// Adds downloaded bytes. False when the reader is gone and the download should stop.
    pub async fn push(&mut self, data: &[u8]) -> bool {
        self.buf.extend_from_slice(data);
        if self.buf.len() < CHUNK {
            return true;
        }
        let chunk = self.buf.split().freeze();
        self.tx.send(Ok(chunk)).await.is_ok()
    }

    /// Ends the object: what is gathered goes out, then end of file.
    pub async fn finish(mut self) {
        if !self.buf.is_empty() {
            let _ = self.tx.send(Ok(self.buf.split().freeze())).await;
        }
    }

    /// Ends the object with an error the reader will return after the bytes before it.
    pub async fn fail(mut self, message: String) {
        if !self.buf.is_empty() {
            let _ = self.tx.send(Ok(self.buf.split().freeze())).await;
        }
        let _ = self.tx.send(Err(message)).await;
    }
}

/// The blocking end of a download: chunks sent by an async task, read by a blocking thread.
pub struct ChunkReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    current: Bytes,
}

impl ChunkReader {
    pub(crate) fn channel() -> (ChunkSender, ChunkReader) {
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        (
            ChunkSender {
                tx,
                buf: BytesMut::with_capacity(CHUNK),
            },
            ChunkReader {
                rx,
                current: Bytes::new(),
            },
        )
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(message)) => return Err(io::Error::other(message)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the spool file was re-read for upload without being hashed again, so bytes
    /// changed on disk after compression went up under the name of the bytes that were hashed.
    #[test]
    fn a_spool_file_changed_after_it_was_hashed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let hash = Sha256::digest(&data);
        let pieces = spool_digests(&path, data.len() as u64, hash, 30_000).unwrap();
        assert_eq!(pieces.len(), 4);
        for (piece, chunk) in pieces.iter().zip(data.chunks(30_000)) {
            assert_eq!(piece.md5, content_md5(chunk));
            assert_eq!(piece.sha256, Sha256::digest(chunk).to_base16());
        }
        let whole = spool_digests(&path, data.len() as u64, hash, data.len() as u64).unwrap();
        assert_eq!(whole.len(), 1);

        let mut changed = data.clone();
        changed[50_000] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        assert!(matches!(
            spool_digests(&path, data.len() as u64, hash, 30_000),
            Err(CacheError::SpoolChanged { .. })
        ));
        std::fs::write(&path, &data[..99_999]).unwrap();
        assert!(matches!(
            spool_digests(&path, data.len() as u64, hash, 30_000),
            Err(CacheError::SpoolChanged {
                actual_size: 99_999,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_file_cache_refuses_a_changed_spool_file_and_shows_nothing() {
        let cache = tempfile::tempdir().unwrap();
        let target = file::FileTarget::create(cache.path()).await.unwrap();
        let spool = cache.path().join("..spool");
        std::fs::write(&spool, b"changed bytes").unwrap();
        let meant = Sha256::digest(b"meant bytes!!");
        let e = target.put_file("nar/x.nar", &spool, 13, meant).await;
        assert!(matches!(e, Err(CacheError::SpoolChanged { .. })), "{e:?}");
        assert_eq!(
            std::fs::read_dir(cache.path().join("nar")).unwrap().count(),
            0
        );
        let right = Sha256::digest(b"changed bytes");
        target
            .put_file("nar/x.nar", &spool, 13, right)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(cache.path().join("nar/x.nar")).unwrap(),
            b"changed bytes"
        );
    }
}
