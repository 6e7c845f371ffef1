//! Build logs, read from Nix's log directory: the worker protocol can add a log but not fetch one.
//!
//! Nix writes a derivation's log to `<log dir>/drvs/<first two characters of its base
//! name>/<the rest>`, bzip2-compressed with a `.bz2` suffix unless `compress-build-log = false`.
//! Nix before 1.12 wrote `drvs/<base name>` directly; `nix log` reads both, and so does this.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nixpush_format::StorePath;
use nixpush_format::store_path::STORE_DIR;
use thiserror::Error;

/// Nix's log directory unless `NIX_LOG_DIR` says otherwise (as it does for Nix).
pub const DEFAULT_LOG_DIR: &str = "/nix/var/log/nix";

/// Logs longer than this (decompressed) are not read: the whole text is held in memory to be
/// uploaded, and a log this long is a runaway build's, not one anybody reads.
pub const MAX_LOG_SIZE: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum LogError {
    #[error("cannot read the build log {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the build log {} is longer than {} MiB; not read",
        .path.display(),
        MAX_LOG_SIZE >> 20
    )]
    TooLarge { path: PathBuf },
}

/// Nix's log directory.
#[derive(Debug, Clone)]
pub struct BuildLogs {
    dir: PathBuf,
}

/// One derivation's log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLog {
    pub drv: StorePath,
    pub file: PathBuf,
    /// When Nix last wrote it: a rebuild writes the same file again.
    pub modified: SystemTime,
}

impl BuildLogs {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BuildLogs { dir: dir.into() }
    }

    /// The directory Nix on this machine writes to.
    pub fn system() -> Self {
        Self::new(std::env::var_os("NIX_LOG_DIR").unwrap_or_else(|| DEFAULT_LOG_DIR.into()))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log Nix kept of building `drv`, if any (a path that was substituted or added has none,
    /// nor a build with `keep-build-log = false`).
    pub fn find(&self, drv: &StorePath) -> Result<Option<BuildLog>, LogError> {
        let base = drv.base_name();
        let drvs = self.dir.join("drvs");
        let (head, rest) = base.split_at(2);
        let candidates = [drvs.join(head).join(rest), drvs.join(base)];
        for plain in candidates {
            for file in [plain.with_added_extension("bz2"), plain] {
                match fs::metadata(&file) {
                    Ok(m) => {
                        return Ok(Some(BuildLog {
                            drv: drv.clone(),
                            modified: m.modified().map_err(|source| LogError::Read {
                                path: file.clone(),
                                source,
                            })?,
                            file,
                        }));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(LogError::Read { path: file, source }),
                }
            }
        }
        Ok(None)
    }

    /// The logs written at or after `since`, in both layouts. Files whose names are not a
    /// derivation's are not logs and are passed over.
    pub fn modified_since(&self, since: SystemTime) -> Result<Vec<BuildLog>, LogError> {
        let drvs = self.dir.join("drvs");
        let mut found = Vec::new();
        let top = match fs::read_dir(&drvs) {
            Ok(d) => d,
            // Nix creates it with its first log.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
            Err(source) => return Err(LogError::Read { path: drvs, source }),
        };
        let read = |path: &Path| {
            let path = path.to_owned();
            move |source| LogError::Read { path, source }
        };
        for entry in top {
            let entry = entry.map_err(read(&drvs))?;
            let kind = entry.file_type().map_err(read(&entry.path()))?;
            if kind.is_dir() {
                let head = entry.file_name();
                let Some(head) = head.to_str() else { continue };
                let sub = match fs::read_dir(entry.path()) {
                    Ok(d) => d,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(LogError::Read {
                            path: entry.path(),
                            source,
                        });
                    }
                };
                for file in sub {
                    let file = file.map_err(read(&entry.path()))?;
                    if let Some(log) = log_of(head, &file, since)? {
                        found.push(log);
                    }
                }
            } else if let Some(log) = log_of("", &entry, since)? {
                found.push(log);
            }
        }
        found.sort_by(|a, b| a.drv.cmp(&b.drv));
        Ok(found)
    }
}

impl BuildLog {
    /// The log's text, decompressed.
    pub fn read(&self) -> Result<Vec<u8>, LogError> {
        let failed = |source| LogError::Read {
            path: self.file.clone(),
            source,
        };
        let file = fs::File::open(&self.file).map_err(failed)?;
        let mut text = Vec::new();
        let limit = MAX_LOG_SIZE + 1;
        if self.file.extension().is_some_and(|e| e == "bz2") {
            bzip2::read::MultiBzDecoder::new(file)
                .take(limit)
                .read_to_end(&mut text)
        } else {
            file.take(limit).read_to_end(&mut text)
        }
        .map_err(failed)?;
        if text.len() as u64 > MAX_LOG_SIZE {
            return Err(LogError::TooLarge {
                path: self.file.clone(),
            });
        }
        Ok(text)
    }
}

/// The log `entry` is, if it is one written at or after `since`; `head` is the name of the
/// two-character directory it is in (empty in the flat layout).
fn log_of(
    head: &str,
    entry: &fs::DirEntry,
    since: SystemTime,
) -> Result<Option<BuildLog>, LogError> {
    let name = entry.file_name();
    let Some(name) = name.to_str() else {
        return Ok(None);
    };
    let base = format!("{head}{}", name.strip_suffix(".bz2").unwrap_or(name));
    let Ok(drv) = format!("{STORE_DIR}/{base}").parse::<StorePath>() else {
        return Ok(None);
    };
    if !drv.is_derivation() {
        return Ok(None);
    }
    let meta = match entry.metadata() {
        Ok(m) => m,
        // Removed since the directory was read.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LogError::Read {
                path: entry.path(),
                source,
            });
        }
    };
    let modified = meta.modified().map_err(|source| LogError::Read {
        path: entry.path(),
        source,
    })?;
    if !meta.is_file() || modified < since {
        return Ok(None);
    }
    Ok(Some(BuildLog {
        drv,
        file: entry.path(),
        modified,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    const DRV: &str = "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv";

    fn bz2(text: &[u8]) -> Vec<u8> {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        e.write_all(text).unwrap();
        e.finish().unwrap()
    }

    fn write(dir: &Path, rel: &str, body: &[u8]) -> PathBuf {
        let file = dir.join("drvs").join(rel);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, body).unwrap();
        file
    }

    #[test]
    fn finds_and_reads_both_layouts_compressed_or_not() {
        let drv: StorePath = DRV.parse().unwrap();
        let cases: [(&str, Vec<u8>); 4] = [
            (
                "hc/z0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv.bz2",
                bz2(b"built\n"),
            ),
            (
                "hc/z0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv",
                b"built\n".to_vec(),
            ),
            (
                "hcz0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv.bz2",
                bz2(b"built\n"),
            ),
            (
                "hcz0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv",
                b"built\n".to_vec(),
            ),
        ];
        for (rel, body) in cases {
            let dir = tempfile::tempdir().unwrap();
            let logs = BuildLogs::new(dir.path());
            assert_eq!(logs.find(&drv).unwrap(), None);
            let file = write(dir.path(), rel, &body);
            let log = logs.find(&drv).unwrap().expect(rel);
            assert_eq!(log.file, file);
            assert_eq!(log.read().unwrap(), b"built\n", "{rel}");
        }
    }

    #[test]
    fn a_corrupt_or_runaway_log_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let drv: StorePath = DRV.parse().unwrap();
        let logs = BuildLogs::new(dir.path());
        let file = write(
            dir.path(),
            "hc/z0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv.bz2",
            b"not bzip2",
        );
        let e = logs.find(&drv).unwrap().unwrap().read().unwrap_err();
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        fs::remove_file(&file).unwrap();
        let big = vec![b'x'; MAX_LOG_SIZE as usize + 1];
        write(
            dir.path(),
            "hc/z0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv.bz2",
            &bz2(&big),
        );
        let e = logs.find(&drv).unwrap().unwrap().read().unwrap_err();
        assert!(matches!(e, LogError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn lists_the_logs_written_since_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let logs = BuildLogs::new(dir.path());
        assert_eq!(logs.modified_since(SystemTime::UNIX_EPOCH).unwrap(), []);
        let old = write(
            dir.path(),
            "aa/a0rpyq8sljlg33vz0pl29n35k4d2w3-old.drv.bz2",
            &bz2(b"old"),
        );
        let then = SystemTime::now() - Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(then - Duration::from_secs(1))
            .unwrap();
        let new = write(
            dir.path(),
            "bb/b0rpyq8sljlg33vz0pl29n35k4d2w3-new.drv",
            b"new",
        );
        let flat = write(
            dir.path(),
            "ccz0rpyq8sljlg33vz0pl29n35k4d2w3-flat.drv.bz2",
            &bz2(b"flat"),
        );
        // Not logs: a name that is no derivation's, and one that is no store path.
        write(dir.path(), "bb/b0rpyq8sljlg33vz0pl29n35k4d2w3-out", b"");
        write(dir.path(), "bb/README", b"");
        let found = logs.modified_since(then).unwrap();
        let files: Vec<&Path> = found.iter().map(|l| l.file.as_path()).collect();
        assert_eq!(files, [new.as_path(), flat.as_path()]);
        assert_eq!(
            found[0].drv.to_string(),
            "/nix/store/bbb0rpyq8sljlg33vz0pl29n35k4d2w3-new.drv"
        );
        assert_eq!(
            logs.modified_since(then - Duration::from_secs(2))
                .unwrap()
                .len(),
            3
        );
    }
}
