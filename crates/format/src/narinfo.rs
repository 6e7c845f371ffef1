//! `.narinfo` files: parse, print in Nix's field order, fingerprint, sign and verify.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::{PublicKey, SecretKey, Sha256, Signature, StorePath};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarInfoError {
    #[error("narinfo has no `{0}` field")]
    Missing(&'static str),
    #[error("narinfo field `{field}` is invalid: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("narinfo line {line} has no `Key: value` form")]
    Line { line: usize },
    #[error("cannot sign or verify a path with NarSize 0")]
    ZeroNarSize,
}

/// What a binary cache says about one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Relative to the cache root, e.g. `nar/<FileHash>.nar.zst`.
    pub url: String,
    /// Kept as written: caches written by other tools may use methods nixpush does not produce.
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted, as Nix writes them; a self-reference is included.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}

/// The string a signature covers (reference §4.1). References are sorted here, whatever order the
/// caller holds them in, so that the same path always yields the same fingerprint.
pub fn fingerprint(
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    references: &[StorePath],
) -> Result<String, NarInfoError> {
    if nar_size == 0 {
        return Err(NarInfoError::ZeroNarSize);
    }
    let mut refs: Vec<String> = references.iter().map(ToString::to_string).collect();
    refs.sort();
    Ok(format!("1;{path};{nar_hash};{nar_size};{}", refs.join(",")))
}

impl NarInfo {
    pub fn fingerprint(&self) -> Result<String, NarInfoError> {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds `key`'s signature, replacing an older one by the same key name.
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), NarInfoError> {
        let sig = key.sign(&self.fingerprint()?);
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
        Ok(())
    }

    /// The name of the first trusted key with a valid signature, if any.
    pub fn verified_by<'k>(&self, trusted: &'k [PublicKey]) -> Option<&'k str> {
        let fp = self.fingerprint().ok()?;
        trusted
            .iter()
            .find(|k| self.sigs.iter().any(|s| k.verify(&fp, s)))
            .map(|k| k.name())
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(n) = self.file_size {
            writeln!(f, "FileSize: {n}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        // The space after the colon stays even with no references: Nix's parser needs it.
        f.write_str("References: ")?;
        for (i, r) in self.references.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(r.base_name())?;
        }
        f.write_str("\n")?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {}", d.base_name())?;
        }
        for s in &self.sigs {
            writeln!(f, "Sig: {s}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

fn invalid(field: &'static str, why: impl fmt::Display) -> NarInfoError {
    NarInfoError::Invalid {
        field,
        why: why.to_string(),
    }
}

fn number(field: &'static str, v: &str) -> Result<u64, NarInfoError> {
    // u64::from_str accepts a leading `+`; Nix does not write one, and neither should a cache.
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(field, format!("{v:?} is not a decimal number")));
    }
    v.parse().map_err(|e| invalid(field, e))
}

impl FromStr for NarInfo {
    type Err = NarInfoError;

    /// Unknown keys are ignored (newer Nix adds some); a missing or malformed required field is an
    /// error naming the field.
    fn from_str(s: &str) -> Result<Self, NarInfoError> {
        let (mut store_path, mut url, mut compression) = (None, None, None);
        let (mut file_hash, mut file_size, mut nar_hash, mut nar_size) = (None, None, None, None);
        let (mut references, mut deriver, mut sigs, mut ca) = (Vec::new(), None, Vec::new(), None);
        for (i, line) in s.split('\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(':')
                .ok_or(NarInfoError::Line { line: i + 1 })?;
            let value = value.strip_prefix(' ').unwrap_or(value);
            match key {
                "StorePath" => {
                    store_path = Some(
                        value
                            .parse::<StorePath>()
                            .map_err(|e| invalid("StorePath", e))?,
                    )
                }
                "URL" if value.is_empty() => return Err(invalid("URL", "empty")),
                "URL" => url = Some(value.to_owned()),
                "Compression" => compression = Some(value.to_owned()),
                "FileHash" => file_hash = Some(value.parse().map_err(|e| invalid("FileHash", e))?),
                "FileSize" => file_size = Some(number("FileSize", value)?),
                "NarHash" => nar_hash = Some(value.parse().map_err(|e| invalid("NarHash", e))?),
                "NarSize" => nar_size = Some(number("NarSize", value)?),
                "References" => {
                    references = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(StorePath::from_base_name)
                        .collect::<Result<_, _>>()
                        .map_err(|e| invalid("References", e))?
                }
                // Very old Nix wrote a placeholder for an unknown deriver.
                "Deriver" if value == "unknown-deriver" => deriver = None,
                "Deriver" => {
                    deriver =
                        Some(StorePath::from_base_name(value).map_err(|e| invalid("Deriver", e))?)
                }
                "Sig" => sigs.push(value.parse().map_err(|e| invalid("Sig", e))?),
                "CA" => ca = Some(value.to_owned()),
                _ => {}
            }
        }
        let nar_size = nar_size.ok_or(NarInfoError::Missing("NarSize"))?;
        if nar_size == 0 {
            return Err(invalid("NarSize", "must not be 0"));
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            // A narinfo without the field predates the field: its NAR is bzip2.
            compression: compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size,
            references,
            deriver,
            sigs,
            ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::tests::arb_store_path;
    use proptest::prelude::*;

    /// Written by Nix 2.8 (`nix copy --to file://…?secret-key=…`) on a machine of this project.
    const FROM_NIX: &str = "StorePath: /nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-example-6
URL: nar/1iz33nwy9c5p4238ix3mcxmaarw3p09fjk7hs3s67vwkjdx6l15g.nar.xz
Compression: xz
FileHash: sha256:1iz33nwy9c5p4238ix3mcxmaarw3p09fjk7hs3s67vwkjdx6l15g
FileSize: 128
NarHash: sha256:12q081idpr50miaxrssx4v14dmpa7fp6k5z6jpl7dwcavy88ccg9
NarSize: 120
References: 
Deriver: kwj9jj9i45ga5fz99lvqz4bz4jvasjqg-example-6.drv
Sig: test-cache-1:PUfDO4YLl4iswvDh8I1bO9GJ3kK5UCH1WPKpG2XWmB3269L4YjoVmg4r0ZtGkahwQ2xAeSje/8f+2fJGLsK/Cg==
";

    #[test]
    fn nix_output_round_trips_byte_for_byte() {
        let ni: NarInfo = FROM_NIX.parse().unwrap();
        assert_eq!(ni.nar_size, 120);
        assert!(ni.references.is_empty());
        assert_eq!(ni.to_string(), FROM_NIX);
    }

    #[test]
    fn empty_references_keep_the_trailing_space() {
        let ni: NarInfo = FROM_NIX.parse().unwrap();
        assert!(ni.to_string().contains("\nReferences: \n"));
    }

    #[test]
    fn fingerprint_format() {
        let ni: NarInfo = FROM_NIX.parse().unwrap();
        assert_eq!(
            ni.fingerprint().unwrap(),
            "1;/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-example-6;\
             sha256:12q081idpr50miaxrssx4v14dmpa7fp6k5z6jpl7dwcavy88ccg9;120;"
        );
        let a = StorePath::from_base_name("a0000000000000000000000000000000-z").unwrap();
        let b = StorePath::from_base_name("b0000000000000000000000000000000-a").unwrap();
        let fp = fingerprint(&ni.store_path, &ni.nar_hash, 1, &[b.clone(), a.clone()]).unwrap();
        assert!(fp.ends_with(&format!(";1;{a},{b}")), "{fp}");
        assert_eq!(
            fingerprint(&a, &ni.nar_hash, 0, &[]),
            Err(NarInfoError::ZeroNarSize)
        );
    }

    #[test]
    fn missing_and_malformed_fields_are_named() {
        for field in ["StorePath", "URL", "NarHash", "NarSize"] {
            let text: String = FROM_NIX
                .lines()
                .filter(|l| !l.starts_with(&format!("{field}:")))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(
                text.parse::<NarInfo>().unwrap_err(),
                NarInfoError::Missing(field)
            );
        }
        for (from, to, field) in [
            ("NarSize: 120", "NarSize: 0", "NarSize"),
            ("NarSize: 120", "NarSize: +120", "NarSize"),
            ("FileSize: 128", "FileSize: lots", "FileSize"),
            ("NarHash: sha256:", "NarHash: md5:", "NarHash"),
            ("References: ", "References: not-a-path", "References"),
            ("Sig: test-cache-1:", "Sig: test-cache-1:AAAA", "Sig"),
            ("Deriver: kwj", "Deriver: /kwj", "Deriver"),
        ] {
            let text = FROM_NIX.replacen(from, to, 1);
            match text.parse::<NarInfo>().unwrap_err() {
                NarInfoError::Invalid { field: f, .. } => assert_eq!(f, field),
                e => panic!("{field}: {e}"),
            }
        }
        assert_eq!(
            "StorePath /nix/store/x".parse::<NarInfo>().unwrap_err(),
            NarInfoError::Line { line: 1 }
        );
    }

    #[test]
    fn unknown_keys_are_ignored_and_compression_defaults_to_bzip2() {
        let text = FROM_NIX.replacen("Compression: xz\n", "", 1) + "System: x86_64-linux\n";
        let ni: NarInfo = text.parse().unwrap();
        assert_eq!(ni.compression, "bzip2");
    }

    #[test]
    fn sign_and_verify() {
        let mut ni: NarInfo = FROM_NIX.parse().unwrap();
        let k1 = SecretKey::generate("k1").unwrap();
        let k2 = SecretKey::generate("k2").unwrap();
        ni.sign(&k1).unwrap();
        ni.sign(&k1).unwrap();
        assert_eq!(
            ni.sigs.len(),
            2,
            "re-signing replaces, and the existing Nix signature stays"
        );
        assert_eq!(
            ni.verified_by(&[k2.public_key(), k1.public_key()]),
            Some("k1")
        );
        assert_eq!(ni.verified_by(&[k2.public_key()]), None);
        ni.nar_size += 1;
        assert_eq!(ni.verified_by(&[k1.public_key()]), None);
    }

    fn arb_narinfo() -> impl Strategy<Value = NarInfo> {
        (
            arb_store_path(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            (1u64.., any::<u64>()),
            proptest::collection::btree_set(arb_store_path(), 0..5),
            proptest::option::of(arb_store_path()),
            proptest::collection::vec("[a-z0-9.-]{1,12}", 0..3),
            proptest::option::of("fixed:r:sha256:[0-9a-z]{52}"),
            prop_oneof![Just("xz"), Just("zstd"), Just("none"), Just("br")],
        )
            .prop_map(|(p, nh, fh, (ns, fs), refs, drv, keys, ca, comp)| {
                let mut ni = NarInfo {
                    url: format!("nar/{}.nar", Sha256(fh).to_nix32()),
                    store_path: p,
                    compression: comp.to_owned(),
                    file_hash: Some(Sha256(fh)),
                    file_size: Some(fs),
                    nar_hash: Sha256(nh),
                    nar_size: ns,
                    references: refs.into_iter().collect(),
                    deriver: drv,
                    sigs: vec![],
                    ca,
                };
                for k in keys {
                    ni.sign(&SecretKey::generate(&k).unwrap()).unwrap();
                }
                ni
            })
    }

    proptest! {
        #[test]
        fn round_trips(ni in arb_narinfo()) {
            prop_assert_eq!(ni.to_string().parse::<NarInfo>().unwrap(), ni);
        }

        #[test]
        fn never_panics(s in "\\PC{0,400}") {
            let _ = s.parse::<NarInfo>();
        }

        #[test]
        fn never_panics_on_near_valid_lines(lines in proptest::collection::vec(
            (prop_oneof![Just("StorePath"), Just("URL"), Just("NarHash"), Just("NarSize"),
                         Just("References"), Just("Sig"), Just("Deriver"), Just("FileSize")],
             "\\PC{0,70}"), 0..10)) {
            let text: String = lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            let _ = text.parse::<NarInfo>();
        }
    }
}
