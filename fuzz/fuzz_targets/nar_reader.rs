#![no_main]
//! Any bytes: the NAR reader returns Ok or Err, never panics, and never reads past what it accepts.

use libfuzzer_sys::fuzz_target;
use nixpush_format::nar::{Limits, TreeBuilder, read_nar};

fuzz_target!(|data: &[u8]| {
    let mut src = data;
    let mut tree = TreeBuilder::default();
    if let Ok(n) = read_nar(&mut src, &mut tree, &Limits::default()) {
        assert_eq!(n as usize + src.len(), data.len());
        assert!(tree.into_tree().is_some());
    }
});
