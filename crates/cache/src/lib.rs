//! Writing Nix binary caches to S3 buckets and directories, and auditing them (also over HTTP).
//!
//! Invariants this crate keeps, whoever calls it:
//! - **Published means complete**: a path's `.narinfo` is written only after its NAR object exists
//!   and after the narinfos of all its references exist (or are known to be elsewhere, for paths
//!   skipped because an upstream cache signs them).
//! - **Nothing unverified is uploaded**: a NAR whose hash or size differs from the store's record is
//!   refused before any byte of it leaves the machine.
//! - **Replays converge**: NAR keys are content-addressed and every write is idempotent, so pushing
//!   again after any failure ends in the same state. Failed multipart uploads are aborted.
//! - **Memory does not grow with NAR size**: NARs stream through hashing and compression into a spool
//!   file and are uploaded from it in bounded parts.

mod cache;
mod error;
pub mod fence;
mod objects;
mod probe;
mod publisher;
pub mod session;
mod source;
mod spool;
mod target;
mod url;
mod verify;

pub use cache::{Cache, CacheReader};
pub use error::{CacheError, error_chain};
pub use objects::Objects;
pub use publisher::{Event, Publisher, PushOptions, PushSummary};
pub use source::{NarSource, SourceError};
pub use spool::{CompressOptions, MEMORY_SPOOL, Spool, SpooledNar, spool_nar};
pub use target::{Conditional, Expect, ObjectEntry, RequestObserver};
pub use url::{AddressingStyle, Location, StoreUrl, UrlError};
pub use verify::{
    Finding, Problem, Scope, Subject, Upstream, Verifier, VerifyEvent, VerifySummary,
};
