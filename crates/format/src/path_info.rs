//! What a store records about a valid path: the input to every narinfo.

use crate::{Sha256, Signature, StorePath};

/// What the store records about a valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub registration_time: u64,
    pub ultimate: bool,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}
