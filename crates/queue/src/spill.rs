//! The second place items are recorded: small files in a directory on another filesystem (by
//! default under `/run`), written by the hook when neither the daemon nor the queue database can
//! take them (the state directory's filesystem is full or read-only, say), and imported into the
//! queue by the daemon as soon as the queue can take them again.
//!
//! One file per hook run, `<unix-ms>-<pid>-<n>.items`, one `kind name` line per item. Each is
//! written under a temporary name (leading `.`), fsynced and renamed, so the daemon never reads a
//! partial file; it deletes a file only after the items in it are committed to the queue.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Item, Kind, Queue, QueueError, now_ms};

const SUFFIX: &str = ".items";

/// Writes `items` to a new file in `dir` (created if missing); returns its path.
pub fn write(dir: &Path, items: &[Item]) -> io::Result<PathBuf> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    crate::owner::create_dir_all(dir)?;
    let name = format!(
        "{}-{}-{}",
        now_ms(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = dir.join(format!(".{name}"));
    let dest = dir.join(format!("{name}{SUFFIX}"));
    let mut text = String::new();
    for it in items {
        text.push_str(it.kind.as_str());
        text.push(' ');
        text.push_str(&it.name);
        text.push('\n');
    }
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &dest)?;
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(dest)
}

/// The spill files waiting in `dir`, oldest first.
pub fn pending(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(SUFFIX) {
            files.push(dir.join(&*name));
        }
    }
    // Names start with the time in milliseconds; equal widths sort as numbers until 2286.
    files.sort();
    Ok(files)
}

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What an import did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// Items new to the queue.
    pub added: usize,
    /// Files that could not be read or held an item `accept` refused, set aside under a `.bad-`
    /// name (never read again), with why.
    pub set_aside: Vec<(PathBuf, String)>,
}

/// Moves every spill file in `dir` into `queue`: each file's items are committed, then the file is
/// removed. A file that cannot be read, or holds an item `accept` refuses, is set aside rather than
/// blocking the others. A queue that cannot take the items stops the import; the files stay for
/// the next call.
pub fn import(
    dir: &Path,
    queue: &mut Queue,
    accept: impl Fn(&Item) -> bool,
) -> Result<Imported, SpillError> {
    let dir_err = |source| SpillError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut imported = Imported::default();
    for path in pending(dir).map_err(dir_err)? {
        let items: Result<Vec<Item>, String> = fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                text.lines()
                    .map(|l| {
                        let (kind, name) = l.split_once(' ').ok_or(format!("bad line {l:?}"))?;
                        let item = Item {
                            name: name.to_owned(),
                            kind: Kind::parse(kind),
                        };
                        if accept(&item) {
                            Ok(item)
                        } else {
                            Err(format!("not a store path of its kind: {l:?}"))
                        }
                    })
                    .collect()
            });
        match items {
            Ok(items) => {
                imported.added += queue.enqueue_via(&items, Some("spill"))?;
                fs::remove_file(&path).map_err(dir_err)?;
            }
            Err(why) => {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let aside = dir.join(format!(".bad-{name}"));
                fs::rename(&path, &aside).map_err(dir_err)?;
                imported.set_aside.push((aside, why));
            }
        }
    }
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_items_are_imported_once_and_in_order() {
        let d = tempfile::tempdir().unwrap();
        let spill = d.path().join("spill");
        let a = Item {
            name: "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-a".into(),
            kind: Kind::Path,
        };
        let b = Item {
            name: "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-b.drv".into(),
            kind: Kind::Derivation,
        };
        write(&spill, std::slice::from_ref(&a)).unwrap();
        write(&spill, &[b.clone(), a.clone()]).unwrap();
        // A file being written (temporary name) is not read.
        fs::write(spill.join(".123-1-0"), "path /nix/store/x").unwrap();
        assert_eq!(pending(&spill).unwrap().len(), 2);
        // One bad file (not UTF-8) and one with an item refused: both set aside, the rest imported.
        fs::write(spill.join("0-1-0.items"), b"path \xff\n").unwrap();
        fs::write(spill.join("0-1-1.items"), "path /nix/store/../../etc\n").unwrap();
        let mut q = Queue::open(&d.path().join("state")).unwrap();
        let accept = |i: &Item| !i.name.contains("..");
        let imported = import(&spill, &mut q, accept).unwrap();
        assert_eq!(imported.added, 2);
        assert_eq!(imported.set_aside.len(), 2, "{imported:?}");
        assert!(pending(&spill).unwrap().is_empty());
        let pending_items = q.pending().unwrap();
        assert_eq!(pending_items, vec![a, b]);
        assert_eq!(import(&spill, &mut q, accept).unwrap(), Imported::default());
    }
}
