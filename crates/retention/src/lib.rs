//! Retention for a shared Nix binary cache that builders keep pushing to.
//!
//! Nix cannot delete from a binary cache, and a cache fed by every build grows without bound. What
//! may go is what no root needs: roots are named pins, the records push sessions leave (what they
//! published or relied on as present), and narinfos written recently. Everything else is garbage,
//! collected so that a reader never meets a narinfo without its NAR or its references.
//!
//! - [`plan`]: the collector's decisions as pure functions: what is live (the closure of the
//!   roots over narinfo `References`), the order in which dead narinfos go (referrers first, so
//!   that what remains stays closed under references), and which NARs no surviving narinfo needs.
//!
//! The protocol between the collector and concurrent pushers, and why it leaves no hole, is in
//! README.md ("Retention"); `tests/model.rs` explores its interleavings.

pub mod collect;
pub mod memo;
pub mod metrics;
pub mod pins;
pub mod plan;

use nixpush_cache::CacheError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RetentionError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(
        "a collection is already under way (run {run} on {host}, {phase}); if it died, its lease \
         runs out within 20 minutes and the next run takes over"
    )]
    Busy {
        run: String,
        host: String,
        phase: String,
    },
    #[error("another collection wrote the collector's state meanwhile; nothing more was deleted")]
    Raced,
    #[error(
        "the server ignores conditional writes (Garage does), so two collections could run at \
         once: run a single scheduled collector and pass --single-runner"
    )]
    NoConditionalWrites,
    #[error(
        "the plan deletes {dead} of {of} narinfos, more than --max-delete {max} allows; nothing was \
         deleted (a missing pin or session prefix looks like this)"
    )]
    TooMuch { dead: usize, of: usize, max: String },
    #[error("the collector could not renew its lease in time; it stopped deleting")]
    LeaseLost,
    #[error(
        "the server gave the collector's state no entity tag, so it cannot be written \
         conditionally: pass --single-runner if only one collector runs"
    )]
    NoEtag,
    #[error("{0} is not in the cache: a pin of it would keep nothing")]
    NotInCache(String),
    #[error("{0:?} is not a pin name: use letters, digits, '-', '_' and '.', not first, up to 200")]
    BadPinName(String),
    #[error("a task of the collection panicked: {0}")]
    Panicked(String),
}
