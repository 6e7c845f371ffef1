//! A cache in a local directory (`file:///DIR`). Every object is written to a temporary name,
//! fsynced and renamed, so a reader never sees a partial narinfo or NAR.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{IncompleteUpload, ObjectEntry, ObjectReader};
use crate::CacheError;

/// Prefix of the temporary files objects are written through; one left behind is an upload a crash
/// interrupted.
const TEMP_PREFIX: &str = ".nixpush-";

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
    /// Where object `key` lives. Keys come from narinfos too (`URL:`), which anyone who can write
    /// to the cache controls: a key must name a file inside the cache directory, so absolute keys and
    /// `.`, `..` or empty components are refused rather than followed (to `/etc/shadow`, say).
    fn path(&self, key: &str) -> Result<PathBuf, CacheError> {
        let inside = !key.is_empty()
            && !key.starts_with('/')
            && key
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if inside {
            Ok(self.dir.join(key))
        } else {
            Err(CacheError::KeyOutsideCache {
                key: key.to_owned(),
                dir: self.dir.clone(),
            })
        }
    }

    pub async fn create(dir: &Path) -> Result<Self, CacheError> {
        tokio::fs::create_dir_all(dir.join("nar"))
            .await
            .map_err(err("creating cache directory", dir))?;
        Ok(FileTarget {
            dir: dir.to_owned(),
        })
    }

    pub async fn existing(dir: &Path) -> Result<Self, CacheError> {
        match tokio::fs::metadata(dir).await {
            Ok(m) if m.is_dir() => Ok(FileTarget {
                dir: dir.to_owned(),
            }),
            Ok(_) => Err(err("opening cache directory", dir)(io::Error::other(
                "not a directory",
            ))),
            Err(e) => Err(err("opening cache directory", dir)(e)),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        let p = self.path(key)?;
        match tokio::fs::metadata(&p).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(err("checking", &p)(e)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let Some((mut f, p)) = self.open(key)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut f, &mut bytes).map_err(err("reading", &p))?;
        Ok(Some(bytes))
    }

    pub async fn read(&self, key: &str) -> Result<Option<ObjectReader>, CacheError> {
        Ok(self.open(key)?.map(|(f, _)| ObjectReader::File(f)))
    }

    /// Opens an object for reading: a regular file (a device such as `/dev/zero` would never end)
    /// that is inside the cache directory also after following symlinks.
    fn open(&self, key: &str) -> Result<Option<(std::fs::File, PathBuf)>, CacheError> {
        let p = self.path(key)?;
        let f = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err("reading", &p)(e)),
        };
        let real = std::fs::canonicalize(&p).map_err(err("reading", &p))?;
        let dir = std::fs::canonicalize(&self.dir).map_err(err("reading", &self.dir))?;
        if !real.starts_with(&dir) {
            return Err(CacheError::KeyOutsideCache {
                key: key.to_owned(),
                dir: self.dir.clone(),
            });
        }
        match f.metadata() {
            Ok(m) if m.is_file() => Ok(Some((f, p))),
            Ok(_) => Err(err("reading", &p)(io::Error::other("not a regular file"))),
            Err(e) => Err(err("reading", &p)(e)),
        }
    }

    /// The top level and `nar/`, where the layout puts narinfos and NARs.
    pub async fn list(&self) -> Result<Vec<ObjectEntry>, CacheError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for sub in ["", "nar"] {
                for (name, meta) in entries(&dir.join(sub))? {
                    if meta.is_file() && !name.starts_with(TEMP_PREFIX) {
                        let key = if sub.is_empty() {
                            name
                        } else {
                            format!("{sub}/{name}")
                        };
                        out.push(ObjectEntry {
                            key,
                            size: meta.len(),
                        });
                    }
                }
            }
            Ok(out)
        })
        .await
        .expect("directory listing panicked")
    }

    pub async fn incomplete_uploads(&self) -> Result<Vec<IncompleteUpload>, CacheError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for sub in ["", "nar"] {
                for (name, _) in entries(&dir.join(sub))? {
                    if name.starts_with(TEMP_PREFIX) {
                        let key = if sub.is_empty() {
                            name
                        } else {
                            format!("{sub}/{name}")
                        };
                        out.push(IncompleteUpload {
                            detail: format!("temporary file {}", dir.join(&key).display()),
                            key,
                        });
                    }
                }
            }
            Ok(out)
        })
        .await
        .expect("directory listing panicked")
    }

    pub async fn put_bytes(&self, key: &str, body: &[u8]) -> Result<(), CacheError> {
        let dest = self.path(key)?;
        let body = body.to_vec();
        run_blocking(move || write_atomically(&dest, |f| f.write_all(&body))).await
    }

    pub async fn put_file(&self, key: &str, src: &Path) -> Result<(), CacheError> {
        let dest = self.path(key)?;
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
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(err("creating a file in", dir))?;
    fill(tmp.as_file_mut())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(err("writing", tmp.path()))?;
    tmp.persist(dest)
        .map_err(|e| err("renaming into place", dest)(e.error))?;
    Ok(())
}

/// The entries of `dir` with their metadata (not following symlinks); a missing `dir` has none.
fn entries(dir: &Path) -> Result<Vec<(String, std::fs::Metadata)>, CacheError> {
    let iter = match std::fs::read_dir(dir) {
        Ok(i) => i,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err("listing", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in iter {
        let entry = entry.map_err(err("listing", dir))?;
        let meta = entry.metadata().map_err(err("listing", &entry.path()))?;
        out.push((entry.file_name().to_string_lossy().into_owned(), meta));
    }
    Ok(out)
}

async fn run_blocking(
    f: impl FnOnce() -> Result<(), CacheError> + Send + 'static,
) -> Result<(), CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("file writer panicked")
}
