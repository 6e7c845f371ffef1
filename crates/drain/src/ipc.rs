//! What the hook sends the daemon over the Unix socket: one JSON line each way.
//!
//! Request: `{"items":[{"name":"/nix/store/…","kind":"path"|"drv"}]}`; reply, sent only after the
//! items are committed to the queue: `{"queued":N}` or `{"error":"…"}`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub items: Vec<WireItem>,
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
    Queued { queued: usize },
    Error { error: String },
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
