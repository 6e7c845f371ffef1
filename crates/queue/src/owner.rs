//! Ownership for a daemon that runs as its own user while the hook runs as root: what root creates
//! in the daemon's directories is given to the owner of the directory it is in, so that the daemon
//! can write and remove it. As any other user these are no-ops (only root can give files away, and
//! what others create is theirs already).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `fs::create_dir_all`, with each directory it creates given to its parent's owner.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {
            give_to_dir_owner(dir);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Gives `path` to the owner and group of the directory it is in, if they differ. Best effort: a
/// file that cannot be given away stays usable by its creator.
pub fn give_to_dir_owner(path: &Path) {
    let (Some(parent), Ok(mine)) = (path.parent(), std::fs::symlink_metadata(path)) else {
        return;
    };
    let Ok(dir) = std::fs::metadata(parent) else {
        return;
    };
    if (mine.uid(), mine.gid()) != (dir.uid(), dir.gid()) {
        let _ = std::os::unix::fs::lchown(path, Some(dir.uid()), Some(dir.gid()));
    }
}
