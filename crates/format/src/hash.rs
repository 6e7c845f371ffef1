//! SHA-256 digests in the forms Nix prints and parses.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::Digest;
use thiserror::Error;

use crate::nix32;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    #[error("hash {0:?} has no `sha256:` or `sha256-` prefix")]
    MissingAlgorithm(String),
    #[error("hash algorithm {0:?} is not supported (only sha256)")]
    UnsupportedAlgorithm(String),
    #[error("hash {0:?} is not base16, nix32 or base64 of 32 bytes")]
    BadDigest(String),
}

/// A SHA-256 digest. `Display` prints Nix's canonical `sha256:<nix32>` form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn digest(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    pub fn to_nix32(&self) -> String {
        nix32::encode(&self.0)
    }

    pub fn to_base16(&self) -> String {
        hex::encode(self.0)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Subresource-integrity form, `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", self.to_base64())
    }

    /// The digest without prefix, its encoding told by its length (64 base16, 52 nix32, 44 base64),
    /// as the worker protocol sends it (base16) and as `nix hash` prints it.
    pub fn parse_bare(s: &str) -> Result<Self, HashError> {
        let bad = || HashError::BadDigest(s.to_owned());
        let bytes = match s.len() {
            64 => decode_base16(s).ok_or_else(bad)?,
            52 => nix32::decode(s, 32).map_err(|_| bad())?,
            44 => STANDARD.decode(s).map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        Ok(Self(bytes.try_into().map_err(|_| bad())?))
    }
}

fn decode_base16(s: &str) -> Option<Vec<u8>> {
    if !s.is_ascii() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

impl FromStr for Sha256 {
    type Err = HashError;

    /// Accepts `sha256:<base16|nix32|base64>` and SRI `sha256-<base64>`.
    fn from_str(s: &str) -> Result<Self, HashError> {
        if let Some(rest) = s.strip_prefix("sha256:") {
            return Self::parse_bare(rest);
        }
        if let Some(rest) = s.strip_prefix("sha256-") {
            let bytes = STANDARD
                .decode(rest)
                .map_err(|_| HashError::BadDigest(s.to_owned()))?;
            return Ok(Self(
                bytes
                    .try_into()
                    .map_err(|_| HashError::BadDigest(s.to_owned()))?,
            ));
        }
        match s.split_once([':', '-']) {
            Some((algo, _))
                if !algo.is_empty() && algo.bytes().all(|c| c.is_ascii_alphanumeric()) =>
            {
                Err(HashError::UnsupportedAlgorithm(algo.to_owned()))
            }
            _ => Err(HashError::MissingAlgorithm(s.to_owned())),
        }
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_nix32())
    }
}

/// Incremental SHA-256 plus a byte count: narHash/narSize and FileHash/FileSize are always needed
/// together.
#[derive(Default, Clone)]
pub struct HashCounter {
    hasher: sha2::Sha256,
    len: u64,
}

impl HashCounter {
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    pub fn finish(self) -> (Sha256, u64) {
        (Sha256(self.hasher.finalize().into()), self.len)
    }
}

/// A writer that hashes and counts what passes through it on the way to `inner`.
pub struct HashingWriter<W> {
    inner: W,
    hash: HashCounter,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hash: HashCounter::default(),
        }
    }

    pub fn finish(self) -> (W, Sha256, u64) {
        let (h, n) = self.hash.finish();
        (self.inner, h, n)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FOO_NAR_NIX32: &str = "1476r2f1nccfi3d6l0yxj5m4xww6irm6x3mhz3ifpzi5nlql1ys2";
    const FOO_NAR_SRI: &str = "sha256-QvtAMbUl/uvi+LCObmqOhvNOapHdA2raiI4xG5zI5pA=";

    #[test]
    fn forms_agree_with_nix() {
        let h: Sha256 = format!("sha256:{FOO_NAR_NIX32}").parse().unwrap();
        assert_eq!(h.to_sri(), FOO_NAR_SRI);
        assert_eq!(FOO_NAR_SRI.parse::<Sha256>().unwrap(), h);
        assert_eq!(Sha256::parse_bare(&h.to_base16()).unwrap(), h);
        assert_eq!(
            format!("sha256:{}", h.to_base64())
                .parse::<Sha256>()
                .unwrap(),
            h
        );
        assert_eq!(h.to_string(), format!("sha256:{FOO_NAR_NIX32}"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            "md5:abc".parse::<Sha256>(),
            Err(HashError::UnsupportedAlgorithm("md5".into()))
        );
        assert!(matches!(
            FOO_NAR_NIX32.parse::<Sha256>(),
            Err(HashError::MissingAlgorithm(_))
        ));
        assert!(matches!(
            "sha256:xyz".parse::<Sha256>(),
            Err(HashError::BadDigest(_))
        ));
        assert!(matches!(
            Sha256::parse_bare(&"g".repeat(64)),
            Err(HashError::BadDigest(_))
        ));
    }

    proptest! {
        #[test]
        fn every_form_round_trips(bytes in any::<[u8; 32]>()) {
            let h = Sha256(bytes);
            prop_assert_eq!(h.to_string().parse::<Sha256>().unwrap(), h);
            prop_assert_eq!(h.to_sri().parse::<Sha256>().unwrap(), h);
            prop_assert_eq!(Sha256::parse_bare(&h.to_base16()).unwrap(), h);
            prop_assert_eq!(Sha256::parse_bare(&h.to_base64()).unwrap(), h);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<Sha256>();
            let _ = Sha256::parse_bare(&s);
        }
    }
}
