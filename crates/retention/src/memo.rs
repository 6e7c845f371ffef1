//! What earlier collections read of each narinfo, by entity tag, kept on the collecting machine:
//! a narinfo listed with the same tag has not changed, so a steady-state run reads only what is
//! new. (The tag changes whenever an object is written anew: on S3 it is the MD5 of the bytes, in
//! a directory the file's size, time and inode.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::Node;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub etag: String,
    pub references: Vec<String>,
    pub nar: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deriver: Option<String>,
    pub file_size: u64,
}

impl Remembered {
    pub fn node(&self) -> Node {
        Node {
            references: self.references.clone(),
            nar: self.nar.clone(),
        }
    }
}

/// Where the memo of the cache at `url` lives: under `$XDG_CACHE_HOME` (or `~/.cache`), named by
/// a hash of the URL.
pub fn default_path(url: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let hash = nixpush_format::Sha256::digest(url.as_bytes()).to_nix32();
    Some(
        base.join("nixpush")
            .join(format!("gc-{}.json", &hash[..16])),
    )
}

/// The memo at `path`; none (with a warning) if it cannot be read: it only saves reads.
pub fn load(path: &Path) -> BTreeMap<String, Remembered> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable gc memo");
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable gc memo");
            BTreeMap::new()
        }
    }
}

/// Replaces the memo at `path` (atomically); a failure is only a warning.
pub fn save(path: &Path, memo: &BTreeMap<String, Remembered>) {
    let written = (|| -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(std::io::BufWriter::new(tmp.as_file()), memo)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    })();
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the gc memo");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memo_round_trips_and_a_broken_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("memo.json");
        assert!(load(&path).is_empty());
        let memo: BTreeMap<String, Remembered> = [(
            "h".to_owned(),
            Remembered {
                etag: "\"e\"".into(),
                references: vec!["r".into()],
                nar: "nar/x.nar".into(),
                deriver: None,
                file_size: 3,
            },
        )]
        .into();
        save(&path, &memo);
        assert_eq!(load(&path), memo);
        std::fs::write(&path, "not json").unwrap();
        assert!(load(&path).is_empty());
    }
}
