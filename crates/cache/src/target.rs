//! Where cache objects live: an S3 bucket, a directory, or (read-only) an HTTP server. Keys are the
//! cache layout's relative names.

use std::io::{self, Read};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::{CacheError, Location, StoreUrl};

mod file;
mod http;
mod s3;

pub(crate) enum Target {
    S3(Box<s3::S3Target>),
    File(file::FileTarget),
    Http(http::HttpTarget),
}

/// An object in a listing: its key and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
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
    pub async fn open(url: &StoreUrl, journal: Option<&Path>) -> Result<Self, CacheError> {
        Ok(match &url.location {
            Location::S3 { bucket } => {
                Target::S3(Box::new(s3::S3Target::open(url, bucket, journal).await?))
            }
            Location::File { dir } => Target::File(file::FileTarget::create(dir).await?),
            Location::Http { .. } => {
                return Err(CacheError::ReadOnly {
                    url: url.display_base(),
                });
            }
        })
    }

    /// Opens a cache to read from, changing nothing: a missing directory is an error.
    pub async fn open_read(url: &StoreUrl) -> Result<Self, CacheError> {
        Ok(match &url.location {
            Location::S3 { bucket } => {
                Target::S3(Box::new(s3::S3Target::open(url, bucket, None).await?))
            }
            Location::File { dir } => Target::File(file::FileTarget::existing(dir).await?),
            Location::Http { base } => Target::Http(http::HttpTarget::open(base)?),
        })
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

    /// A whole small object (narinfo, nix-cache-info), or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match self {
            Target::S3(t) => t.get(key).await,
            Target::File(t) => t.get(key).await,
            Target::Http(t) => t.get(key).await,
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

    /// Uploads a local file of `len` bytes. Atomic for readers: the object appears whole or not at all.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        content_type: &str,
    ) -> Result<(), CacheError> {
        match self {
            Target::S3(t) => t.put_file(key, path, len, content_type).await,
            Target::File(t) => t.put_file(key, path).await,
            Target::Http(t) => Err(CacheError::ReadOnly {
                url: t.base().to_owned(),
            }),
        }
    }
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
