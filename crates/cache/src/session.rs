//! Push sessions as the collector reads them: each push records the store paths it publishes or
//! relies on, and the NARs it found present and did not upload, before it relies on them (see
//! README.md, "Retention"). Kept sessions are roots; old ones are the collector's to delete.

use serde::{Deserialize, Serialize};

/// Where sessions live: `nixpush/sessions/<host>/<id>.json`.
pub const SESSIONS_PREFIX: &str = "nixpush/sessions/";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Which machine pushed: `--keep-last` counts sessions per host.
    pub host: String,
    /// Hash parts of the store paths published or relied on.
    pub paths: Vec<String>,
    /// Keys of the NARs relied on without uploading them.
    #[serde(default)]
    pub nars: Vec<String>,
}

impl Session {
    /// The key of a session of `host` started at `started_ms` (Unix ms), `id` telling apart the
    /// sessions of one millisecond.
    pub fn key(host: &str, started_ms: u128, id: u64) -> String {
        format!(
            "{SESSIONS_PREFIX}{}/{started_ms}-{id:016x}.json",
            sanitize(host)
        )
    }

    /// The host a session key names (its first component below the prefix).
    pub fn host_of(key: &str) -> Option<&str> {
        key.strip_prefix(SESSIONS_PREFIX)?.split('/').next()
    }
}

/// This machine's name, for session keys.
pub fn local_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A host name as one key component: only what is safe in a key and a file name.
fn sanitize(host: &str) -> String {
    let s: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_host_safely() {
        let k = Session::key("build-01.example", 1764490000123, 5);
        assert_eq!(
            k,
            "nixpush/sessions/build-01.example/1764490000123-0000000000000005.json"
        );
        assert_eq!(Session::host_of(&k), Some("build-01.example"));
        let odd = Session::key("../a b/c", 1, 1);
        assert_eq!(Session::host_of(&odd), Some("_.._a_b_c"));
    }
}
