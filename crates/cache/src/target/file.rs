//! A cache in a local directory (`file:///DIR`). Every object is written to a temporary name,
//! fsynced and renamed, so a reader never sees a partial narinfo or NAR.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::CacheError;

pub(crate) struct FileTarget {
    dir: PathBuf,
}

fn err(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError {
    let path = path.to_owned();
    move |source| CacheError::File {
        operation,
        path,
        source,
    }
}

impl FileTarget {
    pub async fn open(dir: &Path) -> Result<Self, CacheError> {
        tokio::fs::create_dir_all(dir.join("nar"))
            .await
            .map_err(err("creating cache directory", dir))?;
        Ok(FileTarget {
            dir: dir.to_owned(),
        })
    }

    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        let p = self.dir.join(key);
        match tokio::fs::metadata(&p).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(err("checking", &p)(e)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let p = self.dir.join(key);
        match tokio::fs::read(&p).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err("reading", &p)(e)),
        }
    }

    pub async fn put_bytes(&self, key: &str, body: &[u8]) -> Result<(), CacheError> {
        let dest = self.dir.join(key);
        let body = body.to_vec();
        run_blocking(move || write_atomically(&dest, |f| f.write_all(&body))).await
    }

    pub async fn put_file(&self, key: &str, src: &Path) -> Result<(), CacheError> {
        let dest = self.dir.join(key);
        let src = src.to_owned();
        run_blocking(move || {
            write_atomically(&dest, |f| {
                io::copy(&mut std::fs::File::open(&src)?, f).map(drop)
            })
        })
        .await
    }
}

/// Writes through a uniquely named temporary file beside `dest` (two paths with identical NARs
/// write the same key at once), fsyncs, and renames it into place.
fn write_atomically(
    dest: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> io::Result<()>,
) -> Result<(), CacheError> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(".nixpush-")
        .tempfile_in(dir)
        .map_err(err("creating a file in", dir))?;
    fill(tmp.as_file_mut())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(err("writing", tmp.path()))?;
    tmp.persist(dest)
        .map_err(|e| err("renaming into place", dest)(e.error))?;
    Ok(())
}

async fn run_blocking(
    f: impl FnOnce() -> Result<(), CacheError> + Send + 'static,
) -> Result<(), CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("file writer panicked")
}
