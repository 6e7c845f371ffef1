use std::path::PathBuf;

use crate::StoreError;

pub const DEFAULT_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// Store URL parameters that select another store than the one the daemon serves.
const STORE_CHOOSING_PARAMETERS: [&str; 5] = ["root", "store", "state", "real", "log"];

/// Where the store's daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAddress {
    /// A daemon listening on a Unix socket.
    Socket(PathBuf),
    /// No daemon: run `nix-daemon --stdio` and talk to it over its stdin and stdout.
    Stdio,
}

impl StoreAddress {
    /// Resolves a store URL in Nix's syntax (`daemon`, `unix://PATH`, `auto`, `local`), or, when none
    /// is given, `NIX_REMOTE`; `auto` means the daemon socket if it exists, else `nix-daemon --stdio`.
    pub fn resolve(url: Option<&str>) -> Result<Self, StoreError> {
        let from_env = std::env::var("NIX_REMOTE").ok().filter(|s| !s.is_empty());
        let url = url
            .map(str::to_owned)
            .or(from_env)
            .unwrap_or_else(|| "auto".to_owned());
        let socket_env = std::env::var_os("NIX_DAEMON_SOCKET_PATH").filter(|s| !s.is_empty());
        let default_socket = socket_env
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_SOCKET.into());
        // Parameters that choose another store (`root=`, `store=`, `state=`, `real=`, `log=`) would
        // be ignored by reading through the daemon, which serves its own: refused. The rest tune the
        // client (`max-connections=`, `path-info-cache-size=`, ...) and do not matter here.
        let (base, params) = url.split_once('?').unwrap_or((&url, ""));
        let choosing: Vec<&str> = params
            .split('&')
            .filter(|p| {
                let name = p.split('=').next().unwrap_or_default();
                STORE_CHOOSING_PARAMETERS.contains(&name)
            })
            .collect();
        if !choosing.is_empty() {
            return Err(StoreError::UnsupportedParameters {
                params: choosing.join("&"),
                url,
            });
        }
        match base {
            "daemon" => Ok(Self::Socket(default_socket)),
            "auto" => Ok(if default_socket.exists() {
                Self::Socket(default_socket)
            } else {
                Self::Stdio
            }),
            "local" => Ok(Self::Stdio),
            _ => match base.strip_prefix("unix://") {
                Some(p) if !p.is_empty() => Ok(Self::Socket(PathBuf::from(p))),
                Some(_) => Ok(Self::Socket(default_socket)),
                None => Err(StoreError::UnsupportedStore(url)),
            },
        }
    }
}
