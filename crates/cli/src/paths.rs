//! Turning command-line arguments into store paths, the way Nix's own commands do.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nixpush_format::StorePath;
use nixpush_format::store_path::STORE_DIR;
use nixpush_store::Store;

/// Resolves an argument to the store paths to push: a store path (or a path inside one), a symlink
/// into the store such as `./result`, or a `.drv`, which stands for its built outputs.
pub fn resolve(arg: &str, store: &Store) -> Result<Vec<StorePath>> {
    let path = store_path_of(arg)?;
    if path.is_derivation() {
        return store
            .derivation_outputs(&path)
            .with_context(|| format!("cannot push the outputs of {path}"));
    }
    Ok(vec![path])
}

/// The store path an argument names: a store path, a path inside one, or a symlink into the store.
pub fn store_path_of(arg: &str) -> Result<StorePath> {
    let in_store = follow_into_store(Path::new(arg))?;
    let rest = in_store
        .strip_prefix(STORE_DIR)
        .expect("checked by follow_into_store");
    let base = rest
        .components()
        .next()
        .context("the store directory itself is not a store path")?;
    StorePath::from_base_name(&base.as_os_str().to_string_lossy())
        .with_context(|| format!("{arg:?} does not name a store path"))
}

/// Follows symlinks until the path is inside the store (as `nix-store` does for `./result`).
fn follow_into_store(arg: &Path) -> Result<PathBuf> {
    let mut cur = if arg.is_absolute() {
        arg.to_owned()
    } else {
        std::env::current_dir()?.join(arg)
    };
    for _ in 0..40 {
        if cur.starts_with(STORE_DIR) && cur != Path::new(STORE_DIR) {
            return Ok(cur);
        }
        match std::fs::read_link(&cur) {
            Ok(target) => {
                cur = match cur.parent() {
                    Some(parent) if target.is_relative() => parent.join(target),
                    _ => target,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{} does not exist", arg.display())
            }
            Err(_) => bail!(
                "{} is not in the Nix store ({STORE_DIR}) and is not a symlink into it",
                arg.display()
            ),
        }
    }
    bail!("{}: too many levels of symlinks", arg.display())
}
