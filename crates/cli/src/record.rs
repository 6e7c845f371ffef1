//! Recording paths to upload, the way the hook does it and `enqueue` and `wait PATH…` do too:
//! rooted against garbage collection, then acknowledged by the daemon after its commit, or written
//! to the queue directly, or spilled to a file for the daemon to import.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::time::Duration;

use nixpush_drain::ipc::{Barrier, Reply, Request, WireItem, WireKind};
use nixpush_format::StorePath;

use crate::config::Config;

/// How the items were recorded.
pub enum Recorded {
    /// Acknowledged by the daemon: committed to the queue, and the daemon knows.
    Daemon,
    /// The daemon could not be reached (why); written to the queue directly.
    Queue { daemon_error: String },
    /// Neither the daemon nor the queue would take them; written to this spill file.
    Spill {
        file: PathBuf,
        daemon_error: String,
        queue_error: String,
    },
}

/// Nothing could record the items: each place, and why it failed.
pub struct NotRecorded {
    pub daemon_error: String,
    pub queue_error: String,
    pub spill_dir: PathBuf,
    pub spill_error: String,
}

impl std::fmt::Display for NotRecorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "daemon not reachable ({}), queue not writable ({}), spill directory {} not writable ({})",
            self.daemon_error,
            self.queue_error,
            self.spill_dir.display(),
            self.spill_error
        )
    }
}

/// Records `items` durably: through the daemon (waiting `timeout` for it), else the queue, else
/// the spill directory.
pub fn record(
    config: &Config,
    items: &[WireItem],
    timeout: Duration,
) -> Result<Recorded, NotRecorded> {
    let request = Request {
        items: items.iter().map(copy).collect(),
        barrier: None,
    };
    let daemon_error = match ask_daemon(config, &request, timeout) {
        Ok(_) => return Ok(Recorded::Daemon),
        Err(e) => e,
    };
    let queue_items: Vec<_> = items.iter().map(WireItem::to_item).collect();
    let direct = nixpush_queue::Queue::open(&config.state_dir())
        .and_then(|mut q| q.enqueue_via(&queue_items, Some("queue")));
    let queue_error = match direct {
        Ok(_) => return Ok(Recorded::Queue { daemon_error }),
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
    };
    let spill_dir = config.spill_dir();
    match nixpush_queue::spill::write(&spill_dir, &queue_items) {
        Ok(file) => Ok(Recorded::Spill {
            file,
            daemon_error,
            queue_error,
        }),
        Err(e) => Err(NotRecorded {
            daemon_error,
            queue_error,
            spill_dir,
            spill_error: e.to_string(),
        }),
    }
}

fn copy(i: &WireItem) -> WireItem {
    WireItem {
        name: i.name.clone(),
        kind: i.kind,
    }
}

/// One request to the daemon over its socket, with `timeout` for connecting and for each read
/// and write (a daemon that stopped accepting must cost that, not the caller's whole budget).
/// Returns the barrier's mark, when the request was one.
pub fn ask_daemon(
    config: &Config,
    request: &Request,
    timeout: Duration,
) -> Result<Option<u64>, String> {
    let socket = config.socket();
    let stream = nixpush_store::unix::connect(&socket, timeout, timeout)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    (&stream)
        .write_all(&line)
        .map_err(|e| format!("sending: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| format!("waiting for the daemon: {e}"))?;
    match serde_json::from_str::<Reply>(&reply) {
        Ok(Reply::Queued { mark, .. }) => Ok(mark),
        Ok(Reply::Error { error }) => Err(format!("daemon refused: {error}")),
        Err(_) if reply.is_empty() => Err("the daemon closed the connection".into()),
        Err(e) => Err(format!("bad reply from the daemon: {e}")),
    }
}

/// Asks the daemon for a barrier (see `nixpush_drain::ipc::Barrier`): its mark once everything
/// recorded before now is numbered.
pub fn barrier(config: &Config, since: Option<u64>, timeout: Duration) -> Result<u64, String> {
    let request = Request {
        items: Vec::new(),
        barrier: Some(Barrier { since }),
    };
    ask_daemon(config, &request, timeout)?
        .ok_or_else(|| "the daemon answered without a mark (an older version?)".to_owned())
}

/// Roots each item's paths before it is recorded, so that a garbage collection before the upload
/// cannot take them. A failure costs the protection, not the record: it is reported (as a
/// `; …` clause to append to a message), and the daemon roots pending items again when it starts.
pub fn protect(roots: &nixpush_store::GcRoots, items: &[WireItem]) -> String {
    let mut failed = Vec::new();
    for WireItem { name, .. } in items {
        let Ok(item) = name.parse::<StorePath>() else {
            continue;
        };
        let done = nixpush_store::GcRoots::paths_of(&item).and_then(|p| roots.protect(&item, &p));
        if let Err(e) = done {
            failed.push(format!("{name}: {e}"));
        }
    }
    match failed.as_slice() {
        [] => String::new(),
        [one, rest @ ..] => format!(
            "; not protected from garbage collection under {} ({one}{})",
            roots.dir().display(),
            if rest.is_empty() {
                String::new()
            } else {
                format!(" and {} more", rest.len())
            }
        ),
    }
}

/// Command-line arguments as items to record, the way `push` reads them: a store path, a path
/// inside one, or a symlink into the store (`./result`); a `.drv` stands for its outputs, which the
/// daemon resolves. Duplicates collapse.
pub fn path_items(args: &[String]) -> anyhow::Result<Vec<WireItem>> {
    let mut seen = std::collections::HashSet::new();
    let mut items = Vec::new();
    for arg in args {
        let path = crate::paths::store_path_of(arg)?;
        let kind = if path.is_derivation() {
            WireKind::Drv
        } else {
            WireKind::Path
        };
        let name = path.to_string();
        if seen.insert(name.clone()) {
            items.push(WireItem { name, kind });
        }
    }
    Ok(items)
}
