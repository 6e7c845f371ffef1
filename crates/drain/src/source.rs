//! The local store as the source of NARs to publish.

use std::sync::Arc;

use nixpush_cache::{NarSource, SourceError};
use nixpush_format::StorePath;
use nixpush_store::Store;

/// Streams NARs from the nix-daemon.
pub struct StoreSource(pub Arc<Store>);

impl NarSource for StoreSource {
    fn write_nar(&self, path: &StorePath, out: &mut dyn std::io::Write) -> Result<(), SourceError> {
        self.0.nar(path, out).map(drop).map_err(Into::into)
    }
}
