//! Store paths: `/nix/store/<32 nix32 chars>-<name>`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::nix32;

/// The only store directory nixpush writes caches for; a cache's `StoreDir` must match the clients'.
pub const STORE_DIR: &str = "/nix/store";
const HASH_LEN: usize = 32;
const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    #[error("{0:?} is not in the Nix store ({STORE_DIR})")]
    NotInStore(String),
    #[error("{0:?} is inside a store path, not a store path itself")]
    Subpath(String),
    #[error("{0:?} has no `<hash>-<name>` form")]
    NoName(String),
    #[error("{0:?} has an invalid hash part (32 nix32 characters expected)")]
    BadHash(String),
    #[error("{0:?} has an invalid name: {1}")]
    BadName(String, &'static str),
}

/// A validated store path. Ordering and equality follow the full path string, which is also the order
/// Nix sorts references in.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // `<hash>-<name>`; both halves validated on construction.
    base: String,
}

impl StorePath {
    /// Parses a base name `<hash>-<name>` (the form used in narinfo `References` and `Deriver`).
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let full = || format!("{STORE_DIR}/{base}");
        if base.contains('/') {
            return Err(StorePathError::Subpath(full()));
        }
        if base.len() < HASH_LEN + 2 || base.as_bytes()[HASH_LEN] != b'-' {
            return Err(StorePathError::NoName(full()));
        }
        let (hash, name) = (&base[..HASH_LEN], &base[HASH_LEN + 1..]);
        if !hash.bytes().all(nix32::is_nix32_char) {
            return Err(StorePathError::BadHash(full()));
        }
        if let Some(why) = name_problem(name) {
            return Err(StorePathError::BadName(full(), why));
        }
        Ok(Self {
            base: base.to_owned(),
        })
    }

    /// The 32-character hash part, which names the path's `.narinfo`.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    pub fn base_name(&self) -> &str {
        &self.base
    }

    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }
}

fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Some("longer than 211 characters");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
    {
        return Some("only letters, digits and + - . _ ? = are allowed");
    }
    if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
        return Some("`.` and `..` (alone or before `-`) are not allowed");
    }
    None
}

impl FromStr for StorePath {
    type Err = StorePathError;

    /// Parses a full path in [`STORE_DIR`]. A path below a store path is an error, not silently
    /// truncated: the caller decides whether that is what the user meant.
    fn from_str(s: &str) -> Result<Self, StorePathError> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned()))?;
        if let Some((first, _)) = base.split_once('/') {
            Self::from_base_name(first)?;
            return Err(StorePathError::Subpath(s.to_owned()));
        }
        Self::from_base_name(base)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: &str = "hcz0rpyq8sljlg33vz0pl29n35k4d2w3";

    #[test]
    fn parses_and_prints() {
        let p: StorePath = format!("/nix/store/{H}-example-6").parse().unwrap();
        assert_eq!(p.hash_part(), H);
        assert_eq!(p.name(), "example-6");
        assert_eq!(p.base_name(), format!("{H}-example-6"));
        assert_eq!(p.to_string(), format!("/nix/store/{H}-example-6"));
        assert!(!p.is_derivation());
        assert!(
            StorePath::from_base_name(&format!("{H}-x.drv"))
                .unwrap()
                .is_derivation()
        );
        // `?` and `=` are legal in names (and a reason the hook must never glob).
        assert!(StorePath::from_base_name(&format!("{H}-a?b=c")).is_ok());
    }

    #[test]
    fn rejects_each_malformed_form() {
        use StorePathError::*;
        type Case = (String, fn(&StorePathError) -> bool);
        let cases: Vec<Case> = vec![
            (format!("/tmp/{H}-x"), |e| matches!(e, NotInStore(_))),
            (format!("/nix/store/{H}-x/bin/sh"), |e| {
                matches!(e, Subpath(_))
            }),
            (format!("/nix/store/{H}"), |e| matches!(e, NoName(_))),
            (format!("/nix/store/{H}-"), |e| matches!(e, NoName(_))),
            (
                "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x".into(),
                |e| matches!(e, BadHash(_)),
            ),
            (format!("/nix/store/{H}-a b"), |e| matches!(e, BadName(..))),
            (format!("/nix/store/{H}-a*"), |e| matches!(e, BadName(..))),
            (format!("/nix/store/{H}-."), |e| matches!(e, BadName(..))),
            (format!("/nix/store/{H}-..-x"), |e| matches!(e, BadName(..))),
            (format!("/nix/store/{H}-{}", "a".repeat(212)), |e| {
                matches!(e, BadName(..))
            }),
            (format!("/nix/store/{H}-é"), |e| matches!(e, BadName(..))),
        ];
        for (input, is_expected) in cases {
            let err = input.parse::<StorePath>().unwrap_err();
            assert!(is_expected(&err), "{input}: {err}");
            assert!(
                err.to_string().contains(&input[..20]),
                "error should name the path: {err}"
            );
        }
        assert!(
            format!("/nix/store/{H}-{}", "a".repeat(211))
                .parse::<StorePath>()
                .is_ok()
        );
    }

    pub fn arb_store_path() -> impl Strategy<Value = StorePath> {
        (
            "[0-9a-df-np-sv-z]{32}",
            "[a-zA-Z0-9+_?=][a-zA-Z0-9+\\-._?=]{0,40}",
        )
            .prop_map(|(h, n)| StorePath::from_base_name(&format!("{h}-{n}")).unwrap())
    }

    proptest! {
        #[test]
        fn round_trips(p in arb_store_path()) {
            prop_assert_eq!(p.to_string().parse::<StorePath>().unwrap(), p.clone());
            prop_assert_eq!(StorePath::from_base_name(p.base_name()).unwrap(), p);
        }

        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            let _ = s.parse::<StorePath>();
            let _ = StorePath::from_base_name(&s);
        }
    }
}
