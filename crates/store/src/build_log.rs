//! Build logs, read from Nix's log directory: the worker protocol can add a log but not fetch one.
//!
//! Nix writes a derivation's log to `<log dir>/drvs/<first two characters of its base
//! name>/<the rest>`, bzip2-compressed with a `.bz2` suffix unless `compress-build-log = false`.
//! Nix before 1.12 wrote `drvs/<base name>` directly; `nix log` reads both, and so does this.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
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
    /// An I/O error: it may pass.
    #[error("cannot read the build log {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not a bzip2 stream Nix finished: the build is still writing it, or the file is damaged.
    #[error("the build log {} is not a complete bzip2 stream", .path.display())]
    Corrupt {
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

impl LogError {
    /// Whether reading again later may succeed.
    pub fn transient(&self) -> bool {
        matches!(self, LogError::Read { source, .. } if source.kind() != io::ErrorKind::NotFound)
    }
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

/// What [`BuildLogs::modified_since`] found, and the directories it could not read.
#[derive(Debug, Default)]
pub struct Listing {
    pub logs: Vec<BuildLog>,
    pub unreadable: Vec<LogError>,
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
    /// nor a build with `keep-build-log = false`): the file `nix log` would read, in its order.
    pub fn find(&self, drv: &StorePath) -> Result<Option<BuildLog>, LogError> {
        let base = drv.base_name();
        let drvs = self.dir.join("drvs");
        let (head, rest) = base.split_at(2);
        for plain in [drvs.join(head).join(rest), drvs.join(base)] {
            for file in [plain.clone(), plain.with_added_extension("bz2")] {
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

    /// The logs of derivations with a log file written at or after `since`, in either layout, each
    /// as [`BuildLogs::find`] chooses it. Files whose names are not a derivation's are passed
    /// over; a subdirectory that cannot be read is reported, and the others are listed all the same.
    pub fn modified_since(&self, since: SystemTime) -> Result<Listing, LogError> {
        let drvs = self.dir.join("drvs");
        let mut listing = Listing::default();
        let top = match fs::read_dir(&drvs) {
            Ok(d) => d,
            // Nix creates it with its first log.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(listing),
            Err(source) => return Err(LogError::Read { path: drvs, source }),
        };
        let mut written = BTreeSet::new();
        for entry in top {
            let entry = entry.map_err(|source| LogError::Read {
                path: drvs.clone(),
                source,
            })?;
            let dir = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                written.extend(written_since("", &entry, since));
                continue;
            }
            let head = entry.file_name();
            let Some(head) = head.to_str() else { continue };
            let files = match fs::read_dir(&dir) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    listing
                        .unreadable
                        .push(LogError::Read { path: dir, source });
                    continue;
                }
            };
            for file in files {
                match file {
                    Ok(file) => written.extend(written_since(head, &file, since)),
                    Err(source) => {
                        listing
                            .unreadable
                            .push(LogError::Read { path: dir, source });
                        break;
                    }
                }
            }
        }
        for drv in written {
            match self.find(&drv) {
                Ok(Some(log)) => listing.logs.push(log),
                // Removed since it was listed.
                Ok(None) => {}
                Err(e) => listing.unreadable.push(e),
            }
        }
        Ok(listing)
    }
}

impl BuildLog {
    /// The log's text, decompressed.
    pub fn read(&self) -> Result<Vec<u8>, LogError> {
        let failed = |source| LogError::Read {
            path: self.file.clone(),
            source,
        };
        let limit = MAX_LOG_SIZE + 1;
        let mut raw = Vec::new();
        fs::File::open(&self.file)
            .and_then(|f| f.take(limit).read_to_end(&mut raw))
            .map_err(failed)?;
        if raw.len() as u64 > MAX_LOG_SIZE {
            return Err(LogError::TooLarge {
                path: self.file.clone(),
            });
        }
        let text = if self.file.extension().is_some_and(|e| e == "bz2") {
            // Decoded from memory: every error here is the stream's, none the disk's.
            let mut text = Vec::new();
            bzip2::read::MultiBzDecoder::new(raw.as_slice())
                .take(limit)
                .read_to_end(&mut text)
                .map_err(|source| LogError::Corrupt {
                    path: self.file.clone(),
                    source,
                })?;
            text
        } else {
            raw
        };
        if text.len() as u64 > MAX_LOG_SIZE {
            return Err(LogError::TooLarge {
                path: self.file.clone(),
            });
        }
        Ok(text)
    }
}

/// Whether Nix is building `drv` now: it holds a lock (`flock`) on `<output>.lock` for each output
/// while it builds, and leaves the file behind after a failed build, so only the lock tells. Read
/// from `/proc/locks` (by inode), which needs no permission on the root-only lock files.
pub fn building(drv: &StorePath) -> io::Result<bool> {
    let outputs = crate::GcRoots::paths_of(drv)?;
    let mut inodes = BTreeSet::new();
    for out in outputs.iter().skip(1) {
        match fs::metadata(format!("{out}.lock")) {
            Ok(m) => {
                inodes.insert(m.ino());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if inodes.is_empty() {
        return Ok(false);
    }
    Ok(flock_inodes(&fs::read_to_string("/proc/locks")?)
        .iter()
        .any(|i| inodes.contains(i)))
}

/// The inodes `flock` locks are held on, from `/proc/locks` lines such as
/// `1: FLOCK  ADVISORY  WRITE 14091 fe:00:9609852 0 EOF` (a waiter's line has `->` first).
fn flock_inodes(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip_while(|f| *f != "FLOCK");
            let device = fields.nth(4)?;
            device.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// The derivation whose log `entry` is, if it was written at or after `since`; `head` is the
/// name of the two-character directory it is in (empty in the flat layout).
fn written_since(head: &str, entry: &fs::DirEntry, since: SystemTime) -> Option<StorePath> {
    let name = entry.file_name();
    let name = name.to_str()?;
    let base = format!("{head}{}", name.strip_suffix(".bz2").unwrap_or(name));
    let drv = format!("{STORE_DIR}/{base}").parse::<StorePath>().ok()?;
    // Removed since the directory was read, or not a file: not a log.
    let meta = entry.metadata().ok()?;
    let modified = meta.modified().ok()?;
    (drv.is_derivation() && meta.is_file() && modified >= since).then_some(drv)
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
        assert!(
            matches!(e, LogError::Corrupt { .. }) && !e.transient(),
            "{e}"
        );
        // A build still running: Nix has not finished the stream.
        let whole = bz2(&vec![b'y'; 100_000]);
        fs::write(&file, &whole[..whole.len() / 2]).unwrap();
        let e = logs.find(&drv).unwrap().unwrap().read().unwrap_err();
        assert!(matches!(e, LogError::Corrupt { .. }), "{e}");
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

    /// `compress-build-log` changed between builds: both files exist, and `nix log` reads the
    /// plain one.
    #[test]
    fn the_file_nix_reads_is_chosen() {
        let dir = tempfile::tempdir().unwrap();
        let drv: StorePath = DRV.parse().unwrap();
        let logs = BuildLogs::new(dir.path());
        write(
            dir.path(),
            "hc/z0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv.bz2",
            &bz2(b"compressed\n"),
        );
        let plain = write(
            dir.path(),
            "hc/z0rpyq8sljlg33vz0pl29n35k4d2w3-hello-2.12.drv",
            b"plain\n",
        );
        assert_eq!(logs.find(&drv).unwrap().unwrap().file, plain);
        let listed = logs.modified_since(SystemTime::UNIX_EPOCH).unwrap().logs;
        assert_eq!(listed.len(), 1, "one log per derivation: {listed:?}");
        assert_eq!(listed[0].file, plain);
    }

    #[test]
    fn flock_locks_are_read_from_proc_locks() {
        let text = "1: FLOCK  ADVISORY  WRITE 14091 fe:00:9609852 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 14092 fe:00:9609852 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 883 00:19:1234 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 77 08:01:42 0 EOF\n";
        assert_eq!(flock_inodes(text), [9609852, 9609852, 42]);
    }

    #[test]
    fn lists_the_logs_written_since_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let logs = BuildLogs::new(dir.path());
        assert_eq!(
            logs.modified_since(SystemTime::UNIX_EPOCH).unwrap().logs,
            []
        );
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
        let found = logs.modified_since(then).unwrap().logs;
        let files: Vec<&Path> = found.iter().map(|l| l.file.as_path()).collect();
        assert_eq!(files, [new.as_path(), flat.as_path()]);
        assert_eq!(
            found[0].drv.to_string(),
            "/nix/store/bbb0rpyq8sljlg33vz0pl29n35k4d2w3-new.drv"
        );
        assert_eq!(
            logs.modified_since(then - Duration::from_secs(2))
                .unwrap()
                .logs
                .len(),
            3
        );
    }
}
