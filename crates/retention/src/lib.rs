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

pub mod plan;
