//! Garbage-collector roots for queued paths, so that a `nix-store --gc` (or Nix's automatic
//! `min-free` collection) between a build and its upload cannot delete what is still to be
//! published.
//!
//! Layout: a directory Nix scans for roots (default `/nix/var/nix/gcroots/nixpush`), holding one
//! directory per queued item, named after the item's store path, with a symlink per path it keeps
//! alive (the item itself, and a derivation's outputs):
//!
//! ```text
//! /nix/var/nix/gcroots/nixpush/<hash>-hello-2.12.drv/<hash>-hello-2.12.drv -> /nix/store/<hash>-hello-2.12.drv
//! /nix/var/nix/gcroots/nixpush/<hash>-hello-2.12.drv/<hash>-hello-2.12     -> /nix/store/<hash>-hello-2.12
//! ```
//!
//! Nix's collector follows directories under `gcroots` and treats every symlink into the store as
//! a root, so nothing here talks to the daemon: the hook creates roots in microseconds, and the
//! daemon removes an item's directory once the item is published, failed or gone.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nixpush_format::StorePath;
use nixpush_format::derivation::derivation_outputs;

/// Derivations larger than this are not read for their outputs (real ones are kilobytes, a few
/// megabytes at most).
const MAX_DRV_SIZE: u64 = 64 << 20;

pub struct GcRoots {
    dir: PathBuf,
}

impl GcRoots {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        GcRoots { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The paths to keep alive for a queued item: the item itself and, for a derivation, the
    /// outputs its file names (read from the store, not asked of the daemon). Outputs a derivation
    /// does not fix (floating content-addressed) cannot be named and are left out.
    pub fn paths_of(item: &StorePath) -> io::Result<Vec<StorePath>> {
        let mut paths = vec![item.clone()];
        if item.is_derivation() {
            let file = item.to_string();
            let len = fs::metadata(&file)?.len();
            if len > MAX_DRV_SIZE {
                return Err(io::Error::other(format!(
                    "{file} is {len} bytes, too large for a derivation"
                )));
            }
            let text = fs::read_to_string(&file)?;
            let outputs = derivation_outputs(&text)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{file}: {e}")))?;
            paths.extend(outputs.into_iter().filter_map(|o| o.path));
        }
        Ok(paths)
    }

    /// Keeps `paths` alive for `item` until [`GcRoots::release`]. Idempotent. The item's directory
    /// gets the owner of the roots directory, so that a daemon running as its own user can remove
    /// what the hook (root) created.
    pub fn protect(&self, item: &StorePath, paths: &[StorePath]) -> io::Result<()> {
        let owner = fs::metadata(&self.dir).or_else(|e| {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
            fs::create_dir_all(&self.dir)?;
            fs::metadata(&self.dir)
        })?;
        let item_dir = self.dir.join(item.base_name());
        match fs::create_dir(&item_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Made anew as far as the sweep's grace goes: the hook is about to record it.
                fs::File::open(&item_dir)?.set_modified(std::time::SystemTime::now())?;
            }
            Err(e) => return Err(e),
        }
        for p in paths {
            match std::os::unix::fs::symlink(p.to_string(), item_dir.join(p.base_name())) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let mine = fs::symlink_metadata(&item_dir)?;
        if (mine.uid(), mine.gid()) != (owner.uid(), owner.gid()) {
            // Only root can give files away; anyone else already owns what it created.
            let _ = std::os::unix::fs::lchown(&item_dir, Some(owner.uid()), Some(owner.gid()));
            for p in paths {
                let _ = std::os::unix::fs::lchown(
                    item_dir.join(p.base_name()),
                    Some(owner.uid()),
                    Some(owner.gid()),
                );
            }
        }
        Ok(())
    }

    /// Lets the collector have `item`'s paths again. Releasing an item that has no roots is not an
    /// error.
    pub fn release(&self, item: &str) -> io::Result<()> {
        // Only a store path's own name is joined: "/nix/store" or "/nix/store/../x" must never
        // name the roots directory itself or anything outside it.
        let Ok(item) = item.parse::<StorePath>() else {
            return Ok(());
        };
        let item_dir = self.dir.join(item.base_name());
        match fs::remove_dir_all(&item_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// When `item`'s roots were made, if it has any.
    pub fn made(&self, item: &str) -> Option<std::time::SystemTime> {
        let item = item.parse::<StorePath>().ok()?;
        fs::symlink_metadata(self.dir.join(item.base_name()))
            .ok()?
            .modified()
            .ok()
    }

    /// How long ago `item`'s roots were made, if it has any.
    pub fn age(&self, item: &str) -> Option<std::time::Duration> {
        Some(self.made(item)?.elapsed().unwrap_or_default())
    }

    /// The items that have roots now, as store paths.
    pub fn items(&self) -> io::Result<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            out.push(format!(
                "{}/{}",
                nixpush_format::store_path::STORE_DIR,
                name.to_string_lossy()
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> StorePath {
        format!("/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-{name}")
            .parse()
            .unwrap()
    }

    #[test]
    fn protect_is_idempotent_and_release_removes_only_that_item() {
        let d = tempfile::tempdir().unwrap();
        let roots = GcRoots::new(d.path().join("roots"));
        let (a, b) = (path("a.drv"), path("b"));
        roots.protect(&a, &[a.clone(), path("a-out")]).unwrap();
        roots.protect(&a, &[a.clone(), path("a-out")]).unwrap();
        roots.protect(&b, std::slice::from_ref(&b)).unwrap();
        let link = d
            .path()
            .join("roots")
            .join(a.base_name())
            .join(path("a-out").base_name());
        assert_eq!(
            fs::read_link(&link).unwrap(),
            PathBuf::from(path("a-out").to_string())
        );
        let mut items = roots.items().unwrap();
        items.sort();
        assert_eq!(items, vec![a.to_string(), b.to_string()]);
        roots.release(&a.to_string()).unwrap();
        roots.release(&a.to_string()).unwrap();
        // Never the roots directory itself, nor anything outside it.
        for bad in [
            "not a store path",
            "/nix/store",
            "/nix/store/",
            "/nix/store/../../x",
        ] {
            roots.release(bad).unwrap();
        }
        assert!(d.path().join("roots").is_dir());
        assert_eq!(roots.items().unwrap(), vec![b.to_string()]);
    }
}
