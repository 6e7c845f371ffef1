//! Nix's binary-cache formats, pure and synchronous.
//!
//! Everything here is a function of its inputs: no I/O beyond the `Read`/`Write` handed in, no async,
//! no network. That keeps every parser fuzzable and every printer testable byte for byte against what
//! real Nix produces. Parsers validate at the boundary and return types (`StorePath`, `Sha256`,
//! `SecretKey`, ...) so code above this crate never re-checks a string.

pub mod cache_keys;
pub mod derivation;
pub mod hash;
pub mod keys;
pub mod nar;
pub mod narinfo;
pub mod nix32;
pub mod path_info;
pub mod store_path;

pub use cache_keys::Compression;
pub use hash::Sha256;
pub use keys::{PublicKey, SecretKey, Signature};
pub use narinfo::NarInfo;
pub use path_info::PathInfo;
pub use store_path::StorePath;
