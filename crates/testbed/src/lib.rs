//! The test bed every integration test shares: real Nix, real S3 servers and a relay that makes
//! the network between them behave like a real one. Everything is private to the test and torn
//! down when dropped, so a failing test (which unwinds) still cleans up.
//!
//! - [`NixDaemon`]: Debian's `nix-daemon` with its own `NIX_CONF_DIR` (no sandbox, no substituters,
//!   optional `post-build-hook`) and its own socket. Clients reach it with `--store unix://SOCKET`.
//!   It shares `/nix/store` with the machine, so every derivation a test builds is made unique.
//! - [`S3Server`]: s3s-fs, Garage or moto ([`S3Kind`]) on free loopback ports, SigV4 checked, with
//!   an anonymous HTTP view that Nix 2.8 (which has no S3 support) substitutes from.
//! - [`Relay`]: latency, a bandwidth limit and seeded faults between any client and any server.

mod nix;
mod relay;
mod s3;

pub use nix::{
    DaemonOptions, NixDaemon, chain_and_diamond, derivation, nix_string, with_dependency,
};
pub use relay::{ConnectionLog, Fault, Faults, Relay, RelayConfig, RequestMatch};
pub use s3::{BucketClient, S3Kind, S3Server};

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A process killed and reaped on drop.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `ready` to hold, polling, unless the process exits first. Readiness of a freshly
/// spawned server is an event the server does not announce, so polling it is the only way.
pub(crate) fn wait_until(
    child: &mut Child,
    what: &str,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!(
                "{what} exited ({status}): {}",
                fs::read_to_string(log).unwrap_or_default()
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what} did not become ready in {STARTUP_TIMEOUT:?}");
}

/// Ports of this process's S3 servers, paused ones included, so that no other test's server is
/// started on a port a paused server will resume on.
static RESERVED_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Records `port` as taken by one of this process's servers. With `fresh`, a port already taken
/// (a paused server's) is refused: `false`.
pub(crate) fn reserve_port(port: u16, fresh: bool) -> bool {
    let mut reserved = RESERVED_PORTS.lock().unwrap();
    if fresh && reserved.contains(&port) {
        return false;
    }
    reserved.insert(port);
    true
}

/// A listener on a loopback port that none of this process's servers holds in reserve (a paused
/// server resumes on its port), itself reserved.
pub(crate) fn bind_loopback() -> std::net::TcpListener {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        if reserve_port(listener.local_addr().unwrap().port(), true) {
            return listener;
        }
    }
}

/// A loopback port that was free a moment ago and that no server of this process holds, for servers
/// that must be told their ports (Garage): they fail to start if it is taken meanwhile, and are
/// started again.
pub(crate) fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !RESERVED_PORTS.lock().unwrap().contains(&port) {
            return port;
        }
    }
}

/// The TCP port process `pid` listens on, from its socket inodes and /proc/net/tcp.
pub(crate) fn listening_port(pid: u32) -> Option<u16> {
    listening_ports(pid).into_iter().next()
}

/// The TCP ports process `pid` listens on, from its socket inodes and /proc/net/tcp.
pub(crate) fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let inodes: std::collections::HashSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            let listening =
                f.get(3) == Some(&"0A") && f.get(9).is_some_and(|i| inodes.contains(*i));
            listening
                .then(|| u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok())
                .flatten()
        })
        .collect()
}

/// A string no other test (or earlier run) has used: derivations built with it are new to the store.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{tag}-{}-{t}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Finds a program on PATH; the test scripts put their tool cache there.
pub fn find_program(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not on PATH; run the tests through scripts/test.sh"))
}

pub fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
