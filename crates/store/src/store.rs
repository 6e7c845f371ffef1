use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use nixpush_format::StorePath;
use nixpush_format::nar::NarError;
use thiserror::Error;

use crate::{Connection, PathInfo, StoreAddress};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot connect to the nix-daemon at {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start `nix-daemon --stdio` (is Nix installed?)")]
    Spawn(#[source] io::Error),
    #[error("nix-daemon protocol version {}.{} is not supported (1.21 or newer is)", .0 >> 8, .0 & 0xff)]
    UnsupportedVersion(u64),
    #[error("store URL {0:?} is not supported (use `daemon`, `auto`, `local` or `unix://SOCKET`)")]
    UnsupportedStore(String),
    #[error(
        "store URL {url:?} (from --store or NIX_REMOTE): {params} would choose another store, but \
         nixpush reads the store through its nix-daemon; point the URL at the daemon that serves \
         that store"
    )]
    UnsupportedParameters { url: String, params: String },
    #[error("nix-daemon: {0}")]
    Daemon(String),
    #[error("nix-daemon protocol error: {0}")]
    Protocol(String),
    #[error("talking to the nix-daemon failed")]
    Io(#[source] io::Error),
    #[error("{0} is not valid in the store (not built, or garbage-collected)")]
    NotValid(StorePath),
    #[error("reading the NAR of {path} from the daemon failed")]
    Nar {
        path: StorePath,
        #[source]
        source: NarError,
    },
    #[error("output `{output}` of {drv} has not been built")]
    OutputNotBuilt { drv: StorePath, output: String },
}

impl StoreError {
    /// Errors after which a connection may be out of step with the daemon and must not be reused.
    fn breaks_connection(&self) -> bool {
        !matches!(
            self,
            StoreError::Daemon(_) | StoreError::NotValid(_) | StoreError::OutputNotBuilt { .. }
        )
    }
}

/// A pool of daemon connections, opened on demand, so that queries and NAR streams run in parallel.
pub struct Store {
    address: StoreAddress,
    idle: Mutex<Vec<Connection>>,
}

impl Store {
    /// Connects once, so a wrong socket or an incompatible daemon is reported before any work.
    pub fn open(address: StoreAddress) -> Result<Self, StoreError> {
        let first = Connection::open(&address)?;
        Ok(Store {
            address,
            idle: Mutex::new(vec![first]),
        })
    }

    /// Runs `f` on an idle connection (or a new one), returning it to the pool unless it failed in a
    /// way that may leave it mid-conversation.
    pub fn with_connection<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => Connection::open(&self.address)?,
        };
        let result = f(&mut conn);
        if !matches!(&result, Err(e) if e.breaks_connection()) {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
        result
    }

    /// Closes the idle connections, so the next requests connect afresh: after one broke, the
    /// others may be just as stale (nix-daemon restarted, say).
    pub fn drop_idle(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn path_info(&self, path: &StorePath) -> Result<PathInfo, StoreError> {
        self.with_connection(|c| c.query_path_info(path))?
            .ok_or_else(|| StoreError::NotValid(path.clone()))
    }

    pub fn nar(&self, path: &StorePath, out: &mut dyn Write) -> Result<u64, StoreError> {
        self.with_connection(|c| c.nar_from_path(path, out))
    }

    /// The output paths of a derivation; every output must have been built.
    pub fn derivation_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, StoreError> {
        let (built, missing) = self.built_outputs(drv)?;
        match missing.into_iter().next() {
            Some(output) => Err(StoreError::OutputNotBuilt {
                drv: drv.clone(),
                output,
            }),
            None => Ok(built),
        }
    }

    /// The outputs of a derivation that are valid in the store, and the names of those that are not
    /// (never built, or garbage-collected since). A derivation that is not valid itself is
    /// [`StoreError::NotValid`]; one with no valid output, [`StoreError::OutputNotBuilt`].
    pub fn built_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<(Vec<StorePath>, Vec<String>), StoreError> {
        // Asked first: for a derivation that is gone, the output map is an error string.
        let valid = self.with_connection(|c| c.query_valid_paths(std::slice::from_ref(drv)))?;
        if valid.is_empty() {
            return Err(StoreError::NotValid(drv.clone()));
        }
        let map = self.with_connection(|c| c.query_derivation_output_map(drv))?;
        let known: Vec<StorePath> = map.values().flatten().cloned().collect();
        let valid = self.with_connection(|c| c.query_valid_paths(&known))?;
        let (mut built, mut missing) = (Vec::new(), Vec::new());
        for (output, path) in map {
            match path {
                Some(p) if valid.contains(&p) => built.push(p),
                _ => missing.push(output),
            }
        }
        if built.is_empty() {
            return Err(StoreError::OutputNotBuilt {
                drv: drv.clone(),
                output: missing.first().cloned().unwrap_or_default(),
            });
        }
        Ok((built, missing))
    }

    /// Path infos of `roots` and everything they reference, transitively, except what lies past a
    /// reference for which `stop` holds (one known to be in the cache with its closure already):
    /// neither it nor what only it leads to is queried or returned. Up to `jobs` queries run at once,
    /// each on its own connection; the first error ends the walk.
    pub fn closure(
        &self,
        roots: &[StorePath],
        jobs: usize,
        stop: impl Fn(&StorePath) -> bool + Sync,
    ) -> Result<BTreeMap<StorePath, PathInfo>, StoreError> {
        crate::walk::closure(roots, jobs, &stop, |p| self.path_info(p))
    }

    /// Path infos of the paths registered (built, substituted, added) at or after `since` (Unix
    /// seconds, as the store records it), queried over up to `jobs` connections at once. A path
    /// collected while the store is listed is left out.
    pub fn registered_since(&self, since: u64, jobs: usize) -> Result<Vec<PathInfo>, StoreError> {
        let all = self.with_connection(|c| c.query_all_valid_paths())?;
        let jobs = jobs.clamp(1, all.len().max(1));
        let chunk = all.len().div_ceil(jobs).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = all
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut found = Vec::new();
                        for p in part {
                            if let Some(info) = self.with_connection(|c| c.query_path_info(p))?
                                && info.registration_time >= since
                            {
                                found.push(info);
                            }
                        }
                        Ok::<_, StoreError>(found)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for h in handles {
                out.extend(h.join().expect("store listing thread panicked")?);
            }
            Ok(out)
        })
    }
}
