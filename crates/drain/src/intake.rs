//! The hook's socket: who may talk to it, each request committed to the queue before it is
//! acknowledged, and barriers (`nixpush wait`) answered once the requests before them are.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use nixpush_format::StorePath;
use nixpush_queue::{Item, Kind, Queue};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::time::Duration;

use crate::ipc::{MAX_REQUEST, Reply, Request};
use crate::worker::Wake;

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

/// What a request needs besides its connection: who may send one, the queue, the worker to wake,
/// the connections still open (for barriers) and the spill directory.
#[derive(Clone)]
pub(crate) struct Intake {
    pub peers: Peers,
    pub queue: Arc<Mutex<Queue>>,
    pub wake: Arc<Wake>,
    pub open: Arc<Open>,
    pub spill_dir: PathBuf,
}

/// The connections accepted and not yet answered, by arrival number: a barrier waits for every
/// connection that arrived before it.
#[derive(Default)]
pub(crate) struct Open {
    next: AtomicU64,
    open: Mutex<BTreeSet<u64>>,
    closed: Notify,
}

/// One accepted connection, open until dropped.
pub(crate) struct Ticket {
    number: u64,
    open: Arc<Open>,
}

impl Open {
    pub(crate) fn enter(self: &Arc<Self>) -> Ticket {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(number);
        Ticket {
            number,
            open: self.clone(),
        }
    }

    /// Returns once no connection that arrived before `ticket` is open.
    async fn settled_before(&self, ticket: &Ticket) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            // Registered before the check: a close between the check and the await still wakes us.
            closed.as_mut().enable();
            let first = self
                .open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .copied();
            if first.is_none_or(|n| n >= ticket.number) {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.open
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.number);
        self.open.closed.notify_waiters();
    }
}

/// What the socket accepts as an item: a store path, or a derivation for `drv` items. The hook
/// validated it already; the socket and the spill directory are inputs all the same.
pub(crate) fn accepts(item: &Item) -> bool {
    item.name
        .parse::<StorePath>()
        .is_ok_and(|p| item.kind == Kind::Path || p.is_derivation())
}

/// One request: read, validate, commit, then acknowledge. A barrier is answered once every
/// connection accepted before it has been answered and the spill directory imported, with the mark
/// that then covers them all.
pub(crate) async fn handle(conn: UnixStream, ticket: Ticket, intake: Intake) {
    // Who is asking, decided before the request is read, answered after (a reply to an unread
    // request would meet a closed pipe).
    let refused = match conn.peer_cred() {
        Ok(cred) if intake.peers.allow(&cred) => None,
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
            Ok(req) => answer(req, &ticket, &intake)
                .await
                .unwrap_or_else(|error| Reply::Error { error }),
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    drop(ticket);
}

async fn answer(req: Request, ticket: &Ticket, intake: &Intake) -> Result<Reply, String> {
    let items: Vec<_> = req
        .items
        .iter()
        .map(|i| i.to_item())
        .filter(accepts)
        .collect();
    let queued = if items.is_empty() {
        0
    } else {
        let queue = intake.queue.clone();
        let n = tokio::task::spawn_blocking(move || {
            queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue(&items)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
        intake.wake.arrived.notify_one();
        n
    };
    let Some(barrier) = req.barrier else {
        return Ok(Reply::Queued { queued, mark: None });
    };
    intake.open.settled_before(ticket).await;
    crate::worker::import_spill(
        &tokio::runtime::Handle::current(),
        intake.spill_dir.clone(),
        intake.queue.clone(),
        &mut None,
    )
    .await;
    // A mark that leaves spilled items out would let a wait pass without them.
    if let Ok(left) = nixpush_queue::spill::pending(&intake.spill_dir)
        && !left.is_empty()
    {
        return Err(format!(
            "{} spill file(s) in {} cannot be queued yet (see the daemon's log)",
            left.len(),
            intake.spill_dir.display()
        ));
    }
    let queue = intake.queue.clone();
    let mark = tokio::task::spawn_blocking(move || {
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        let mark = q.mark()?;
        // Someone waits for these now: a backoff scheduled for the daemon's own patience would
        // only make the wait run out.
        q.expedite(barrier.since, mark)?;
        Ok::<_, nixpush_queue::QueueError>(mark)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
    intake.wake.wanted.notify_one();
    Ok(Reply::Queued {
        queued,
        mark: Some(mark),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// A barrier waits for every connection accepted before it, in whatever order they close, and
    /// for none accepted after it.
    #[tokio::test]
    async fn a_barrier_waits_for_the_connections_before_it_only() {
        let open = Arc::new(Open::default());
        let (first, second) = (open.enter(), open.enter());
        let barrier = open.enter();
        let later = open.enter();
        let waiting = {
            let open = open.clone();
            tokio::spawn(async move { open.settled_before(&barrier).await })
        };
        settle().await;
        assert!(!waiting.is_finished(), "two connections before it are open");
        drop(second);
        settle().await;
        assert!(!waiting.is_finished(), "the first is still open");
        drop(first);
        waiting.await.unwrap();
        drop(later);
    }
}
