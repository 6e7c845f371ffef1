//! What the hook sends the daemon over the Unix socket: one JSON line each way.
//!
//! Request: `{"items":[{"name":"/nix/store/…","kind":"path"|"drv"}]}`, and for a barrier
//! (`nixpush wait`, `enqueue --wait`) also `"barrier":{"since":MARK}`. Reply, sent only after the
//! items are committed to the queue: `{"queued":N}`, with `"mark":M` for a barrier, or
//! `{"error":"…"}`. A barrier's mark is the queue's request number once every connection accepted
//! before it was answered: everything recorded by then is numbered at most M.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    #[serde(default)]
    pub items: Vec<WireItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barrier: Option<Barrier>,
}

/// Asks for the mark that covers every request before this one, and for the queued items last
/// requested after `since` (all, without it) to be tried now rather than after their backoff.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Barrier {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireItem {
    pub name: String,
    pub kind: WireKind,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WireKind {
    Path,
    Drv,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Queued {
        queued: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mark: Option<u64>,
    },
    Error {
        error: String,
    },
}

/// A request line larger than this is not from our hook.
pub const MAX_REQUEST: usize = 16 << 20;

impl WireItem {
    pub fn to_item(&self) -> nixpush_queue::Item {
        let kind = match self.kind {
            WireKind::Path => nixpush_queue::Kind::Path,
            WireKind::Drv => nixpush_queue::Kind::Derivation,
        };
        nixpush_queue::Item {
            name: self.name.clone(),
            kind,
        }
    }
}
