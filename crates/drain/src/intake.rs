//! The hook's socket: who may talk to it, and each request committed to the queue before it is
//! acknowledged.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use nixpush_format::StorePath;
use nixpush_queue::Queue;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::time::Duration;

use crate::ipc::{MAX_REQUEST, Reply, Request, WireKind};

/// How long a peer may take to send its request line.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Who may queue paths through the socket: root (the hook runs as root under nix-daemon), the
/// daemon's own user, and members of `socket-group`. The socket's mode already keeps others out;
/// this holds even if the mode is loosened.
#[derive(Clone, Copy)]
pub(crate) struct Peers {
    own_uid: u32,
    group: Option<u32>,
}

impl Peers {
    fn allow(&self, cred: &tokio::net::unix::UCred) -> bool {
        if cred.uid() == 0 || cred.uid() == self.own_uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        if cred.gid() == group {
            return true;
        }
        // Supplementary groups: the peer process's own list, as the kernel has it.
        cred.pid()
            .and_then(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .is_some_and(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Groups:"))
                    .is_some_and(|g| g.split_whitespace().any(|g| g.parse() == Ok(group)))
            })
    }
}

pub(crate) fn bind(socket: &Path, group: Option<&str>) -> Result<(UnixListener, Peers)> {
    if let Some(dir) = socket.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("something is already listening on {}", socket.display());
        }
        fs::remove_file(socket)
            .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
    }
    // Created owner-only from the start: no moment where another user could connect.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(socket);
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("cannot listen on {}", socket.display()))?;
    let mut peers = Peers {
        // SAFETY: geteuid cannot fail and touches no memory.
        own_uid: unsafe { libc::geteuid() },
        group: None,
    };
    if let Some(group) = group {
        let Some(gid) = uzers::get_group_by_name(group).map(|g| g.gid()) else {
            bail!("socket-group `{group}` does not exist");
        };
        peers.group = Some(gid);
        std::os::unix::fs::chown(socket, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", socket.display()))?;
        fs::set_permissions(socket, fs::Permissions::from_mode(0o660))?;
    }
    Ok((listener, peers))
}

/// One hook request: read, validate, commit, then acknowledge.
pub(crate) async fn handle_hook(
    conn: UnixStream,
    peers: Peers,
    intake: Arc<Mutex<Queue>>,
    work: Arc<Notify>,
) {
    // Who is asking, decided before the request is read, answered after (a reply to an unread
    // request would meet a closed pipe).
    let refused = match conn.peer_cred() {
        Ok(cred) if peers.allow(&cred) => None,
        Ok(cred) => Some(format!("uid {} gid {}", cred.uid(), cred.gid())),
        Err(e) => Some(format!("unknown peer ({e})")),
    };
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    // A peer that sends nothing (or never ends its line) must not hold a task and a descriptor
    // for good: the hook sends its one line at once.
    let read_request = tokio::time::timeout(
        REQUEST_DEADLINE,
        BufReader::new(read.take(MAX_REQUEST as u64)).read_line(&mut line),
    )
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no complete request within 10 s",
        ))
    });
    let reply = match read_request {
        _ if refused.is_some() => {
            let who = refused.unwrap_or_default();
            tracing::warn!(peer = %who, "refused a request on the hook socket: not root, this user or socket-group");
            Reply::Error {
                error: format!("refused: {who} is not root, the daemon's user or in socket-group"),
            }
        }
        Err(e) => Reply::Error {
            error: format!("reading the request: {e}"),
        },
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error {
                error: format!("bad request: {e}"),
            },
            Ok(req) => {
                // The hook validated these already; the socket is still an input, so check again.
                let items: Vec<_> = req
                    .items
                    .iter()
                    .filter(|i| {
                        i.name
                            .parse::<StorePath>()
                            .is_ok_and(|p| i.kind == WireKind::Path || p.is_derivation())
                    })
                    .map(|i| i.to_item())
                    .collect();
                let committed = tokio::task::spawn_blocking(move || {
                    intake
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue(&items)
                })
                .await;
                match committed {
                    Ok(Ok(n)) => {
                        work.notify_one();
                        Reply::Queued { queued: n }
                    }
                    Ok(Err(e)) => Reply::Error {
                        error: format!("{:#}", anyhow::Error::from(e)),
                    },
                    Err(e) => Reply::Error {
                        error: e.to_string(),
                    },
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}
