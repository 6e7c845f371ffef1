//! Where cache objects go: an S3 bucket or a directory. Keys are the cache layout's relative names.

use std::path::Path;

use crate::{CacheError, Location, StoreUrl};

mod file;
mod s3;

pub(crate) enum Target {
    S3(Box<s3::S3Target>),
    File(file::FileTarget),
}

impl Target {
    pub async fn open(url: &StoreUrl, journal: Option<&Path>) -> Result<Self, CacheError> {
        Ok(match &url.location {
            Location::S3 { bucket } => {
                Target::S3(Box::new(s3::S3Target::open(url, bucket, journal).await?))
            }
            Location::File { dir } => Target::File(file::FileTarget::open(dir).await?),
        })
    }

    /// Aborts multipart uploads a crash left behind (recorded in the journal).
    pub async fn abort_journaled(&self) -> Result<usize, CacheError> {
        match self {
            Target::S3(t) => t.abort_journaled().await,
            Target::File(_) => Ok(0),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        match self {
            Target::S3(t) => t.exists(key).await,
            Target::File(t) => t.exists(key).await,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match self {
            Target::S3(t) => t.get(key).await,
            Target::File(t) => t.get(key).await,
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
        }
    }
}
