//! Where NARs come from: the store, in production; anything that can write a path's NAR, in tests.

use std::io::Write;

use nixpush_format::StorePath;

pub trait NarSource: Send + Sync {
    /// Writes the NAR of `path` to `out`.
    fn write_nar(&self, path: &StorePath, out: &mut dyn Write) -> Result<(), SourceError>;
}

pub type SourceError = Box<dyn std::error::Error + Send + Sync>;
