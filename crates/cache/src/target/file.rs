//! A cache in a local directory (`file:///DIR`). Every object is written to a temporary name,
//! fsynced and renamed, so a reader never sees a partial narinfo or NAR.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

use nixpush_format::Sha256;
use nixpush_format::hash::HashingWriter;

use super::{Conditional, Expect, IncompleteUpload, ObjectEntry, ObjectReader};
use crate::CacheError;

/// Objects and directories are readable by everyone: whoever serves the directory (nginx, a
/// static file server) usually runs as another user. What the cache holds is public to its
/// substituters anyway; the signing key is what must stay secret.
const OBJECT_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// Prefix of the temporary files objects are written through; one left behind is an upload a crash
/// interrupted.
const TEMP_PREFIX: &str = ".nixpush-";
/// How long a conditional write waits for another writer's lock (each holds it for one small
/// write).
const LOCK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// The directories of the layout below the top level: NARs and build logs.
const SUBDIRS: [&str; 2] = ["nar", "log"];

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

    /// Opens the cache directory for writing, creating it and the layout's directories (in a cache
    /// an earlier version made, `log/` too) as needed.
    pub async fn create(dir: &Path) -> Result<Self, CacheError> {
        for sub in SUBDIRS {
            create_dirs(&dir.join(sub))?;
        }
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

    pub async fn size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        let p = self.path(key)?;
        match tokio::fs::metadata(&p).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err("checking", &p)(e)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.get_dated(key).await?.map(|(body, _)| body))
    }

    pub async fn get_dated(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<std::time::SystemTime>)>, CacheError> {
        let Some((mut f, p)) = self.open(key)? else {
            return Ok(None);
        };
        let modified = f.metadata().and_then(|m| m.modified()).ok();
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut f, &mut bytes).map_err(err("reading", &p))?;
        Ok(Some((bytes, modified)))
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

    /// The top level, `nar/` and `log/`, where the layout puts narinfos, NARs and build logs.
    pub async fn list(&self) -> Result<Vec<ObjectEntry>, CacheError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for sub in std::iter::once("").chain(SUBDIRS) {
                for (name, meta) in entries(&dir.join(sub))? {
                    if meta.is_file() && !name.starts_with(TEMP_PREFIX) {
                        let key = if sub.is_empty() {
                            name
                        } else {
                            format!("{sub}/{name}")
                        };
                        out.push(entry_of(key, &meta));
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
            for sub in std::iter::once("").chain(SUBDIRS) {
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
        run_blocking(move || {
            if let Some(parent) = dest.parent() {
                create_dirs(parent)?;
            }
            write_atomically(&dest, |f| f.write_all(&body), |_| Ok(()))
        })
        .await
    }

    pub async fn head(&self, key: &str) -> Result<Option<ObjectEntry>, CacheError> {
        let p = self.path(key)?;
        match tokio::fs::metadata(&p).await {
            Ok(m) => Ok(Some(entry_of(key.to_owned(), &m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err("checking", &p)(e)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let p = self.path(key)?;
        tokio::task::spawn_blocking(move || {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(err("deleting", &p)(e)),
            }
            let dir = p.parent().unwrap_or(Path::new("/"));
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err("syncing", dir))
        })
        .await
        .expect("deleting panicked")
    }

    /// The check and the write happen under an exclusive lock on a file in the cache, which every
    /// conditional write to this cache takes: as atomic as S3's, for writers on this machine (and
    /// on a network filesystem whose locks work).
    pub async fn put_if(
        &self,
        key: &str,
        body: Vec<u8>,
        expect: &Expect,
    ) -> Result<Conditional, CacheError> {
        let dest = self.path(key)?;
        let lock = self.dir.join("nixpush").join("conditional-writes.lock");
        let (key, expect) = (key.to_owned(), expect.clone());
        tokio::task::spawn_blocking(move || {
            create_dirs(lock.parent().expect("has a parent"))?;
            let held = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock)
                .and_then(|f| lock_within(&f, LOCK_DEADLINE).map(|()| f))
                .map_err(err("locking", &lock))?;
            let current = match std::fs::metadata(&dest) {
                Ok(m) => Some(entry_of(key.clone(), &m)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(err("checking", &dest)(e)),
            };
            let holds = match (&expect, current) {
                (Expect::Absent, current) => current.is_none(),
                (Expect::Etag(etag), Some(current)) => current.etag.as_ref() == Some(etag),
                (Expect::Etag(_), None) => false,
            };
            if !holds {
                return Ok(Conditional::Refused);
            }
            if let Some(parent) = dest.parent() {
                create_dirs(parent)?;
            }
            write_atomically(&dest, |f| f.write_all(&body), |_| Ok(()))?;
            let written = std::fs::metadata(&dest).map_err(err("checking", &dest))?;
            drop(held);
            Ok(Conditional::Written(entry_of(key, &written).etag))
        })
        .await
        .expect("conditional write panicked")
    }

    /// The objects below the directory part of `prefix` whose keys start with it; `shallow`: in
    /// that directory only.
    pub async fn list_prefix(
        &self,
        prefix: &str,
        shallow: bool,
    ) -> Result<Vec<ObjectEntry>, CacheError> {
        let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = if dir_part.is_empty() {
            self.dir.clone()
        } else {
            self.path(dir_part)?
        };
        let (root, prefix) = (self.dir.clone(), prefix.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut todo = vec![start];
            while let Some(dir) = todo.pop() {
                for (name, meta) in entries(&dir)? {
                    if name.starts_with(TEMP_PREFIX) {
                        continue;
                    }
                    let path = dir.join(&name);
                    let key = path
                        .strip_prefix(&root)
                        .expect("below the cache")
                        .to_string_lossy()
                        .into_owned();
                    if meta.is_dir() {
                        if !shallow && (key.starts_with(&prefix) || prefix.starts_with(&key)) {
                            todo.push(path);
                        }
                    } else if (meta.is_file() || meta.file_type().is_symlink())
                        && key.starts_with(&prefix)
                    {
                        // A link is listed, and refused when read if it leads out of the cache.
                        out.push(entry_of(key, &meta));
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .expect("directory listing panicked")
    }

    /// Copies the spool file `src`, hashing what is copied: a file that no longer holds the `len`
    /// bytes with SHA-256 `hash` is refused before it becomes visible.
    pub async fn put_file(
        &self,
        key: &str,
        src: &Path,
        len: u64,
        hash: Sha256,
    ) -> Result<(), CacheError> {
        let dest = self.path(key)?;
        let src = src.to_owned();
        run_blocking(move || {
            let copy = |f: &mut std::fs::File| {
                let mut out = HashingWriter::new(f);
                io::copy(&mut std::fs::File::open(&src)?, &mut out)?;
                let (_, h, n) = out.finish();
                Ok((h, n))
            };
            let check = |(h, n): (Sha256, u64)| {
                if h == hash && n == len {
                    return Ok(());
                }
                Err(CacheError::SpoolChanged {
                    path: src.clone(),
                    expected_hash: hash,
                    expected_size: len,
                    actual_hash: h,
                    actual_size: n,
                })
            };
            write_atomically(&dest, copy, check)
        })
        .await
    }
}

/// Creates `sub` and its missing parents. Directories created here get DIR_MODE whatever the umask;
/// an existing one keeps the mode its owner chose (0750 with a web server's group, say).
fn create_dirs(sub: &Path) -> Result<(), CacheError> {
    let missing: Vec<&Path> = sub.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        std::fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(d)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(DIR_MODE)))
            .map_err(err("creating cache directory", d))?;
    }
    Ok(())
}

/// Writes through a uniquely named temporary file beside `dest` (two paths with identical NARs
/// write the same key at once), fsyncs it, lets `check` refuse it, renames it into place and
/// fsyncs the directory, so the object survives a power cut once this returns. Objects are
/// world-readable (0644): a cache directory is served by a web server running as another user.
fn write_atomically<T>(
    dest: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> io::Result<T>,
    check: impl FnOnce(T) -> Result<(), CacheError>,
) -> Result<(), CacheError> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .permissions(std::fs::Permissions::from_mode(OBJECT_MODE))
        .tempfile_in(dir)
        .map_err(err("creating a file in", dir))?;
    let filled = fill(tmp.as_file_mut())
        .and_then(|t| tmp.as_file().sync_all().map(|()| t))
        .map_err(err("writing", tmp.path()))?;
    check(filled)?;
    // The umask may have narrowed the mode given at creation.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(OBJECT_MODE))
        .map_err(err("setting the mode of", tmp.path()))?;
    tmp.persist(dest)
        .map_err(|e| err("renaming into place", dest)(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("syncing", dir))?;
    Ok(())
}

/// Takes an exclusive lock on `f`, or fails after `deadline` (a writer stuck on a hung network
/// filesystem must not hold every other forever).
fn lock_within(f: &std::fs::File, deadline: std::time::Duration) -> io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("another writer held the lock for {} s", deadline.as_secs()),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// A file's listing entry. Its entity tag is its size and modification time: it changes whenever
/// the file is written anew (each write is a new file renamed into place).
fn entry_of(key: String, meta: &std::fs::Metadata) -> ObjectEntry {
    use std::os::unix::fs::MetadataExt;
    ObjectEntry {
        key,
        size: meta.len(),
        modified: meta.modified().ok(),
        etag: Some(format!(
            "{}-{}.{}-{}",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino()
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_elsewhere_is_given_up_on_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let holder = std::fs::File::create(&path).unwrap();
        holder.lock().unwrap();
        let other = std::fs::File::open(&path).unwrap();
        let e = lock_within(&other, std::time::Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        drop(holder);
        lock_within(&other, std::time::Duration::from_millis(50)).unwrap();
    }
}
