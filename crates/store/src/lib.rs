//! The local Nix store, as a nix-daemon client.
//!
//! nixpush never reads `/nix/var/nix/db` or walks `/nix/store` itself: the daemon is the authority on
//! which paths are valid, their recorded hashes, references and signatures, and it serves their NARs.
//! The exceptions are [`GcRoots`], which reads a `.drv` file's text to root its outputs without a
//! round trip to the daemon, and [`BuildLogs`], read from Nix's log directory since the protocol
//! has no way to fetch one.
//! That works for root and for unprivileged users alike, and against any daemon version from Nix 2.1
//! (protocol 1.21) on.

mod address;
mod build_log;
mod gc_roots;
mod protocol;
mod store;
pub mod unix;
mod walk;

pub use address::StoreAddress;
pub use build_log::{
    BuildLog, BuildLogs, DEFAULT_LOG_DIR, Listing, LogError, MAX_LOG_SIZE, building,
};
pub use gc_roots::GcRoots;
pub use nixpush_format::PathInfo;
pub use protocol::Connection;
pub use store::{Store, StoreError};
