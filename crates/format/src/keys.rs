//! Ed25519 signing keys and signatures in Nix's `name:base64` text form.
//!
//! Secret key material never reaches `Debug`, `Display` or an error message: errors say what is
//! wrong with a key, never what it contains.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("invalid key name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("malformed {what}: {why}")]
    Malformed {
        what: &'static str,
        why: &'static str,
    },
    #[error("could not get random bytes for a new key: {0}")]
    Random(String),
}

/// Key names are `name` in `name:base64`; Nix splits on the first colon.
pub fn check_key_name(name: &str) -> Result<(), KeyError> {
    let why = if name.is_empty() {
        "empty"
    } else if name.contains(':') {
        "contains `:`"
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "contains whitespace or a control character"
    } else {
        return Ok(());
    };
    Err(KeyError::BadName {
        name: name.to_owned(),
        why,
    })
}

fn split<'a>(s: &'a str, what: &'static str) -> Result<(&'a str, Vec<u8>), KeyError> {
    // Key files written by hand or by `echo` end in a newline; Nix accepts that, so do we.
    let s = s.trim_end_matches(['\n', '\r']);
    let (name, b64) = s.split_once(':').ok_or(KeyError::Malformed {
        what,
        why: "no `name:` prefix",
    })?;
    if name.is_empty() {
        return Err(KeyError::Malformed {
            what,
            why: "empty key name",
        });
    }
    let bytes = STANDARD.decode(b64).map_err(|_| KeyError::Malformed {
        what,
        why: "not valid base64",
    })?;
    Ok((name, bytes))
}

/// A secret signing key. `Debug` shows only its name.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        check_key_name(name)?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    pub fn sign(&self, message: &str) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(message.as_bytes()).to_bytes(),
        }
    }

    /// The key file's contents (`name:base64(seed ‖ public key)`, libsodium's layout). This is the
    /// one way to get the secret out, and it is named so that nobody calls it by accident.
    pub fn to_secret_file_contents(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.key.to_keypair_bytes())
        )
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "secret key";
        let (name, bytes) = split(s, WHAT)?;
        check_key_name(name)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| KeyError::Malformed {
            what: WHAT,
            why: "not 64 bytes long",
        })?;
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::Malformed {
            what: WHAT,
            why: "its public half does not belong to its seed",
        })?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A public key as listed in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when `sig` is by this key (same name) and valid for `message`.
    pub fn verify(&self, message: &str, sig: &Signature) -> bool {
        sig.key_name == self.name
            && self
                .key
                .verify(
                    message.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "public key";
        let (name, bytes) = split(s.trim(), WHAT)?;
        check_key_name(name)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed {
            what: WHAT,
            why: "not 32 bytes long",
        })?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Malformed {
            what: WHAT,
            why: "not a valid Ed25519 point",
        })?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A detached signature, `keyname:base64(64 bytes)`, as in a narinfo `Sig:` line.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}

impl FromStr for Signature {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "signature";
        let (name, bytes) = split(s, WHAT)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| KeyError::Malformed {
            what: WHAT,
            why: "not 64 bytes long",
        })?;
        Ok(Self {
            key_name: name.to_owned(),
            bytes,
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, STANDARD.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 8032 §7.1 "TEST SHA(abc)" key pair, in Nix's encoding.
    const SK: &str = "test:gz/mJAkje51i7HdYdSCRHpp1nOwdGXVbfakBuW3KPULsFyuTrV5WO/STLHDhJFA0w1Rn7y79TWTr+BloNGfivw==";
    const PK: &str = "test:7Bcrk61eVjv0kyxw4SRQNMNUZ+8u/U1k6/gZaDRn4r8=";

    #[test]
    fn rfc8032_vector_in_nix_form() {
        let sk: SecretKey = SK.parse().unwrap();
        assert_eq!(sk.public_key().to_string(), PK);
        assert_eq!(sk.to_secret_file_contents(), SK);
        let sig = sk.sign("");
        assert_eq!(sig.key_name(), "test");
        let pk: PublicKey = PK.parse().unwrap();
        assert!(pk.verify("", &sig));
        assert!(!pk.verify("x", &sig));
        // Accepted with the trailing newline a hand-written key file has.
        assert!(format!("{SK}\n").parse::<SecretKey>().is_ok());
    }

    #[test]
    fn debug_leaks_no_key_material() {
        let sk: SecretKey = SK.parse().unwrap();
        let dbg = format!("{sk:?} {sk:#?}");
        let b64 = SK.split_once(':').unwrap().1;
        for window in b64.as_bytes().windows(8) {
            assert!(!dbg.contains(std::str::from_utf8(window).unwrap()), "{dbg}");
        }
        assert!(dbg.contains("test") && dbg.contains("redacted"));
    }

    #[test]
    fn errors_never_contain_the_key() {
        // Flip the public half so the pair is inconsistent.
        let mut bad = SK.to_owned();
        bad.replace_range(60..61, "A");
        let err = bad.parse::<SecretKey>().unwrap_err().to_string();
        assert!(!err.contains(&SK[5..20]), "{err}");
        assert!(err.contains("secret key"), "{err}");
        for input in ["", "test", "test:", "test:!!!", ":AAAA", "a:b:c"] {
            let err = input.parse::<SecretKey>().unwrap_err();
            assert!(matches!(
                err,
                KeyError::Malformed { .. } | KeyError::BadName { .. }
            ));
        }
    }

    #[test]
    fn key_names_are_checked() {
        assert!(SecretKey::generate("").is_err());
        assert!(SecretKey::generate("a:b").is_err());
        assert!(SecretKey::generate("a b").is_err());
        assert!(SecretKey::generate("cache.example.org-1").is_ok());
    }

    proptest! {
        #[test]
        fn keys_and_signatures_round_trip(name in "[a-zA-Z0-9._-]{1,30}", msg in "\\PC{0,100}") {
            let sk = SecretKey::generate(&name).unwrap();
            let again: SecretKey = sk.to_secret_file_contents().parse().unwrap();
            prop_assert_eq!(again.to_secret_file_contents(), sk.to_secret_file_contents());
            let pk = sk.public_key();
            prop_assert_eq!(pk.to_string().parse::<PublicKey>().unwrap(), pk.clone());
            let sig = sk.sign(&msg);
            let sig2: Signature = sig.to_string().parse().unwrap();
            prop_assert_eq!(&sig2, &sig);
            prop_assert!(pk.verify(&msg, &sig2));
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,120}") {
            let _ = s.parse::<SecretKey>();
            let _ = s.parse::<PublicKey>();
            let _ = s.parse::<Signature>();
        }
    }
}
