//! Object names and content types of the binary-cache layout (reference §3).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::{Sha256, StorePath};

pub const NIX_CACHE_INFO: &str = "nix-cache-info";
pub const CONTENT_TYPE_CACHE_INFO: &str = "text/x-nix-cache-info";
pub const CONTENT_TYPE_NARINFO: &str = "text/x-nix-narinfo";
pub const CONTENT_TYPE_NAR: &str = "application/x-nix-nar";
pub const CONTENT_TYPE_LOG: &str = "text/plain; charset=utf-8";

/// `<hashpart>.narinfo`: its existence is what makes a path valid for clients.
pub fn narinfo_key(path: &StorePath) -> String {
    format!("{}.narinfo", path.hash_part())
}

/// `log/<derivation base name>`: the build log `nix log` asks substituters for (an output is
/// mapped to its derivation through its narinfo's `Deriver`).
pub fn log_key(drv: &StorePath) -> String {
    format!("log/{}", drv.base_name())
}

/// `nar/<FileHash nix32>.nar[.ext]`: content-addressed, so an existing object never needs rewriting.
pub fn nar_key(file_hash: &Sha256, compression: Compression) -> String {
    format!(
        "nar/{}.nar{}",
        file_hash.to_nix32(),
        compression.extension()
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown compression {0:?} (expected xz, zstd or none)")]
pub struct UnknownCompression(pub String);

/// The compressions nixpush writes. (Nix also reads bzip2 and br; nixpush does not produce them.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
        }
    }
}

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "xz" => Ok(Compression::Xz),
            "zstd" => Ok(Compression::Zstd),
            other => Err(UnknownCompression(other.to_owned())),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_nix() {
        let p = StorePath::from_base_name("hcz0rpyq8sljlg33vz0pl29n35k4d2w3-example-6").unwrap();
        assert_eq!(narinfo_key(&p), "hcz0rpyq8sljlg33vz0pl29n35k4d2w3.narinfo");
        let h: Sha256 = "sha256:1iz33nwy9c5p4238ix3mcxmaarw3p09fjk7hs3s67vwkjdx6l15g"
            .parse()
            .unwrap();
        assert_eq!(
            nar_key(&h, Compression::Xz),
            "nar/1iz33nwy9c5p4238ix3mcxmaarw3p09fjk7hs3s67vwkjdx6l15g.nar.xz"
        );
        assert_eq!(
            nar_key(&h, Compression::Zstd),
            format!("nar/{}.nar.zst", h.to_nix32())
        );
        assert_eq!(
            nar_key(&h, Compression::None),
            format!("nar/{}.nar", h.to_nix32())
        );
        for c in [Compression::None, Compression::Xz, Compression::Zstd] {
            assert_eq!(c.as_str().parse::<Compression>().unwrap(), c);
        }
        assert!("bzip3".parse::<Compression>().is_err());
    }
}
