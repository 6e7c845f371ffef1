//! The Nix ARchive format.
//!
//! A NAR is a sequence of length-prefixed, zero-padded strings (see the reference, §1). The writer
//! dumps a filesystem tree exactly as `nix-store --dump` does; the reader validates while streaming,
//! reads exactly the NAR's bytes from its source (so it finds the end of an unframed NAR on a daemon
//! socket), and never buffers file contents.

mod reader;
mod tree;
mod writer;

pub use reader::{Limits, NarError, NarVisitor, copy_nar, read_nar};
pub use tree::{Node, TreeBuilder};
pub use writer::{DumpError, dump_path, write_node};

pub(crate) const MAGIC: &[u8] = b"nix-archive-1";

/// Bytes of zero padding after a string of `len` bytes.
pub(crate) fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}
