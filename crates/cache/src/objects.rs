//! The cache's objects as such, for what manages a cache rather than publishes to it (`nixpush
//! gc`, pins): listings with times and entity tags, reads, conditional writes and deletions.

use std::sync::Arc;

use crate::fence::{Observation, Watch};
use crate::target::{Conditional, Expect, ObjectEntry, RequestObserver, Target};
use crate::{CacheError, StoreUrl};

#[derive(Clone)]
pub struct Objects {
    target: Arc<Target>,
    watch: Arc<Watch>,
}

impl Objects {
    /// Opens a cache to manage (for S3: resolves credentials and checks the bucket). A directory
    /// must exist already: managing one that does not is a typo.
    pub async fn open(
        url: &StoreUrl,
        observer: Option<RequestObserver>,
    ) -> Result<Self, CacheError> {
        if let crate::Location::File { dir } = &url.location
            && !dir.is_dir()
        {
            return Err(CacheError::NoCacheDirectory { dir: dir.clone() });
        }
        Ok(Self::of(Target::open(url, None, observer).await?))
    }

    /// Opens a cache to read, changing nothing (a directory's layout is not created).
    pub async fn open_read(
        url: &StoreUrl,
        observer: Option<RequestObserver>,
    ) -> Result<Self, CacheError> {
        Ok(Self::of(Target::open_read_observed(url, observer).await?))
    }

    fn of(target: Target) -> Self {
        let target = Arc::new(target);
        Objects {
            watch: Arc::new(Watch::new(target.clone())),
            target,
        }
    }

    /// The collector's state, once no collection is deleting (waiting while one is).
    pub async fn look(&self) -> Result<Observation, CacheError> {
        self.watch.look_after(std::time::Instant::now()).await
    }

    /// The objects whose keys start with `prefix`; `shallow`: not those below a further `/`.
    pub async fn list(&self, prefix: &str, shallow: bool) -> Result<Vec<ObjectEntry>, CacheError> {
        self.target.list_prefix(prefix, shallow).await
    }

    /// Like [`Objects::list`], for keys that continue `prefix` with a nix32 hash (narinfos, NARs):
    /// on S3, listed as 32 prefixes at once, since one listing pages through 1,000 keys a round
    /// trip. Keys that continue otherwise are not listed there.
    pub async fn list_hashed(
        &self,
        prefix: &str,
        shallow: bool,
    ) -> Result<Vec<ObjectEntry>, CacheError> {
        if !self.target.is_s3() {
            return self.list(prefix, shallow).await;
        }
        let mut shards = tokio::task::JoinSet::new();
        for c in nixpush_format::nix32::ALPHABET.iter().map(|&b| b as char) {
            let (target, prefix) = (self.target.clone(), format!("{prefix}{c}"));
            shards.spawn(async move { target.list_prefix(&prefix, shallow).await });
        }
        let mut all = Vec::new();
        while let Some(shard) = shards.join_next().await {
            all.extend(shard.expect("listing panicked")?);
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    /// The bucket's versioning status (see [`Objects::is_s3`]): `Enabled` keeps deleted objects as
    /// noncurrent versions, which can be restored.
    pub async fn versioning(&self) -> Result<Option<String>, CacheError> {
        self.target.versioning().await
    }

    pub fn is_s3(&self) -> bool {
        self.target.is_s3()
    }

    pub async fn head(&self, key: &str) -> Result<Option<ObjectEntry>, CacheError> {
        self.target.head(key).await
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.target.get(key).await
    }

    pub async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), CacheError> {
        self.target.put_bytes(key, body, content_type).await
    }

    /// Writes only if `expect` holds.
    pub async fn put_if(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        expect: &Expect,
    ) -> Result<Conditional, CacheError> {
        self.target.put_if(key, body, content_type, expect).await
    }

    /// Deletes up to 1,000 objects at once (one request on S3).
    pub async fn delete_many(&self, keys: &[String]) -> Result<(), CacheError> {
        self.target.delete_many(keys).await
    }

    pub async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.target.delete(key).await
    }
}
