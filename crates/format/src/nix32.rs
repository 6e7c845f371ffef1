//! Nix's base-32 encoding ("nix32").
//!
//! The bytes are read as one little-endian integer and printed five bits at a time, most significant
//! digit first, with an alphabet that omits `e`, `o`, `u` and `t`.

use thiserror::Error;

pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Nix32Error {
    #[error("expected {expected} nix32 characters, got {got}")]
    Length { expected: usize, got: usize },
    #[error("invalid nix32 character {0:?}")]
    Character(char),
    #[error("nix32 value does not fit in {0} bytes")]
    Overflow(usize),
}

/// Number of characters that encode `nbytes` bytes (52 for SHA-256, 32 for a store-path hash).
pub const fn encoded_len(nbytes: usize) -> usize {
    if nbytes == 0 {
        0
    } else {
        (nbytes * 8 - 1) / 5 + 1
    }
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let lo = u16::from(bytes[i]) >> j;
        let hi = bytes.get(i + 1).map_or(0, |&b| u16::from(b) << (8 - j));
        out.push(ALPHABET[usize::from((lo | hi) & 0x1f)] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

pub(crate) fn is_nix32_char(c: u8) -> bool {
    digit(c).is_some()
}

/// Decodes exactly `nbytes` bytes; the string must have exactly `encoded_len(nbytes)` characters and
/// must not set bits beyond the last byte.
pub fn decode(s: &str, nbytes: usize) -> Result<Vec<u8>, Nix32Error> {
    if let Some(c) = s
        .chars()
        .find(|&c| !c.is_ascii() || digit(c as u8).is_none())
    {
        return Err(Nix32Error::Character(c));
    }
    let expected = encoded_len(nbytes);
    if s.len() != expected {
        return Err(Nix32Error::Length {
            expected,
            got: s.len(),
        });
    }
    let mut out = vec![0u8; nbytes];
    for (n, c) in s.bytes().rev().enumerate() {
        // Checked above: every character is a digit.
        let d = digit(c).unwrap_or_default();
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        out[i] |= d << j;
        let carry = (u16::from(d) >> (8 - j)) as u8;
        if i + 1 < nbytes {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Nix32Error::Overflow(nbytes));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sha256_of_abc_matches_nix() {
        let digest = [
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
            0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
            0xf2, 0x00, 0x15, 0xad,
        ];
        let s = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        assert_eq!(encode(&digest), s);
        assert_eq!(decode(s, 32).unwrap(), digest);
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(20), 32);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(decode("0", 1), Err(Nix32Error::Length { .. })));
        let mut s = "0".repeat(52);
        s.replace_range(3..4, "e");
        assert_eq!(decode(&s, 32), Err(Nix32Error::Character('e')));
        // 52 digits carry 260 bits; a top digit above 0b1 sets bits past the 256th.
        let over = format!("z{}", "0".repeat(51));
        assert_eq!(decode(&over, 32), Err(Nix32Error::Overflow(32)));
        assert!(decode(&format!("é{}", "0".repeat(50)), 32).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 1..64)) {
            let s = encode(&bytes);
            prop_assert_eq!(decode(&s, bytes.len()).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in "\\PC{0,60}", n in 1usize..40) {
            let _ = decode(&s, n);
        }
    }
}
