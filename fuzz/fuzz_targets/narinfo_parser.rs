#![no_main]
//! Any text: the narinfo parser never panics, and what it accepts prints and parses back the same.

use libfuzzer_sys::fuzz_target;
use nixpush_format::NarInfo;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(info) = text.parse::<NarInfo>() {
            assert_eq!(info.to_string().parse::<NarInfo>().unwrap(), info);
        }
    }
});
