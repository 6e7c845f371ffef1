//! The client side of the nix-daemon worker protocol (reference §7).
//!
//! One `Connection` is one sequential conversation: request, stderr frames, reply. Concurrency comes
//! from several connections (see `Store`).

use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::process::{Child, Command, Stdio};

use nixpush_format::nar::copy_nar;
use nixpush_format::{PathInfo, Sha256, StorePath};

use crate::{StoreAddress, StoreError};

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;

const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;

const OP_QUERY_ALL_VALID_PATHS: u64 = 23;
const OP_QUERY_PATH_INFO: u64 = 26;
const OP_QUERY_VALID_PATHS: u64 = 31;
const OP_NAR_FROM_PATH: u64 = 38;
const OP_QUERY_DERIVATION_OUTPUT_MAP: u64 = 41;

/// 1.35: the newest version without the 1.38 feature exchange. Daemons from 2.15 on (and Lix) accept
/// it; older ones negotiate down to their own.
const CLIENT_VERSION: u64 = (1 << 8) | 35;
const MIN_VERSION: u64 = (1 << 8) | 21;

/// Strings from the daemon are paths, hashes, signatures and log lines; anything this large is a
/// broken stream, not data.
const MAX_STRING: u64 = 64 << 20;
const MAX_LIST: u64 = 1 << 24;

/// A nix-daemon that accepts no connection in this long is not serving.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// No reply byte, or no room to send, for this long: the daemon (or the disk under it) has stalled,
/// and the connection is dropped instead of waited on forever. Every answer, and every piece of a
/// NAR stream, comes far sooner from a working daemon.
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

pub struct Connection {
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
    version: u64,
    child: Option<Child>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn proto(msg: impl Into<String>) -> StoreError {
    StoreError::Protocol(msg.into())
}

impl Connection {
    pub fn open(addr: &StoreAddress) -> Result<Self, StoreError> {
        let (r, w, child): (Box<dyn Read + Send>, Box<dyn Write + Send>, _) = match addr {
            StoreAddress::Socket(path) => {
                let s =
                    crate::unix::connect(path, CONNECT_TIMEOUT, IO_TIMEOUT).map_err(|source| {
                        StoreError::Connect {
                            socket: path.clone(),
                            source,
                        }
                    })?;
                let w = s.try_clone().map_err(StoreError::Io)?;
                (Box::new(s), Box::new(w), None)
            }
            StoreAddress::Stdio => {
                let mut child = Command::new("nix-daemon")
                    .arg("--stdio")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(StoreError::Spawn)?;
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err(proto("nix-daemon --stdio has no pipes"));
                };
                (Box::new(stdout), Box::new(stdin), Some(child))
            }
        };
        let mut c = Connection {
            r: BufReader::with_capacity(256 * 1024, r),
            w: BufWriter::new(w),
            version: 0,
            child,
        };
        c.handshake()?;
        Ok(c)
    }

    /// The negotiated protocol version, `(major << 8) | minor`.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn minor(&self) -> u64 {
        self.version & 0xff
    }

    fn handshake(&mut self) -> Result<(), StoreError> {
        self.put(WORKER_MAGIC_1)?;
        self.flush()?;
        if self.int()? != WORKER_MAGIC_2 {
            return Err(proto("the peer is not a nix-daemon (bad magic)"));
        }
        let daemon = self.int()?;
        if daemon >> 8 != 1 || daemon < MIN_VERSION {
            return Err(StoreError::UnsupportedVersion(daemon));
        }
        self.version = daemon.min(CLIENT_VERSION);
        self.put(CLIENT_VERSION)?;
        if self.minor() >= 14 {
            self.put(0)?; // obsolete CPU affinity
        }
        if self.minor() >= 11 {
            self.put(0)?; // obsolete reserveSpace
        }
        self.flush()?;
        if self.minor() >= 33 {
            self.string()?; // the daemon's Nix version
        }
        if self.minor() >= 35 {
            self.int()?; // whether it trusts us; nothing we do needs trust
        }
        self.stderr()
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.w.flush().map_err(StoreError::Io)
    }

    fn put(&mut self, n: u64) -> Result<(), StoreError> {
        self.w.write_all(&n.to_le_bytes()).map_err(StoreError::Io)
    }

    fn put_str(&mut self, s: &str) -> Result<(), StoreError> {
        self.put(s.len() as u64)?;
        self.w.write_all(s.as_bytes()).map_err(StoreError::Io)?;
        let pad = (8 - s.len() % 8) % 8;
        self.w.write_all(&[0u8; 8][..pad]).map_err(StoreError::Io)
    }

    fn int(&mut self) -> Result<u64, StoreError> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                proto("the daemon closed the connection")
            } else {
                StoreError::Io(e)
            }
        })?;
        Ok(u64::from_le_bytes(b))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, StoreError> {
        let len = self.int()?;
        if len > MAX_STRING {
            return Err(proto(format!("string of {len} bytes from the daemon")));
        }
        let mut v = vec![0u8; len as usize + (8 - len as usize % 8) % 8];
        self.r.read_exact(&mut v).map_err(StoreError::Io)?;
        v.truncate(len as usize);
        Ok(v)
    }

    fn string(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?).map_err(|_| proto("non-UTF-8 string from the daemon"))
    }

    fn strings(&mut self) -> Result<Vec<String>, StoreError> {
        let n = self.int()?;
        if n > MAX_LIST {
            return Err(proto(format!("list of {n} items from the daemon")));
        }
        (0..n).map(|_| self.string()).collect()
    }

    fn optional_path(&mut self) -> Result<Option<StorePath>, StoreError> {
        let s = self.string()?;
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|e| proto(format!("daemon sent a bad store path: {e}")))
    }

    fn paths(&mut self) -> Result<Vec<StorePath>, StoreError> {
        self.strings()?
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| proto(format!("daemon sent a bad store path: {e}")))
            })
            .collect()
    }

    fn skip_fields(&mut self) -> Result<(), StoreError> {
        for _ in 0..self.int()? {
            match self.int()? {
                0 => {
                    self.int()?;
                }
                1 => {
                    self.bytes()?;
                }
                t => return Err(proto(format!("unknown log field type {t}"))),
            }
        }
        Ok(())
    }

    /// Reads log frames until the reply starts; a daemon-side error becomes `StoreError::Daemon`.
    fn stderr(&mut self) -> Result<(), StoreError> {
        loop {
            match self.int()? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT | STDERR_WRITE => {
                    self.bytes()?;
                }
                STDERR_START_ACTIVITY => {
                    self.int()?; // id
                    self.int()?; // level
                    self.int()?; // type
                    self.bytes()?; // text
                    self.skip_fields()?;
                    self.int()?; // parent
                }
                STDERR_STOP_ACTIVITY => {
                    self.int()?;
                }
                STDERR_RESULT => {
                    self.int()?;
                    self.int()?;
                    self.skip_fields()?;
                }
                STDERR_READ => return Err(proto("the daemon asked for data nixpush never sends")),
                STDERR_ERROR => return Err(self.error_frame()),
                t => return Err(proto(format!("unknown stderr frame {t:#x}"))),
            }
        }
    }

    fn error_frame(&mut self) -> StoreError {
        let msg = (|| -> Result<String, StoreError> {
            if self.minor() >= 26 {
                self.bytes()?; // "Error"
                self.int()?; // level
                self.bytes()?; // name
                let msg = self.string()?;
                self.int()?; // obsolete position
                for _ in 0..self.int()? {
                    self.int()?;
                    self.bytes()?;
                }
                Ok(msg)
            } else {
                let msg = self.string()?;
                self.int()?; // exit status
                Ok(msg)
            }
        })();
        match msg {
            Ok(m) => StoreError::Daemon(strip_ansi(&m)),
            Err(e) => e,
        }
    }

    fn request(
        &mut self,
        op: u64,
        write_args: impl FnOnce(&mut Self) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.put(op)?;
        write_args(self)?;
        self.flush()?;
        self.stderr()
    }

    /// `None` when the path is not valid (never built, or garbage-collected).
    pub fn query_path_info(&mut self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        let result = self.request(OP_QUERY_PATH_INFO, |c| c.put_str(&path.to_string()));
        match result {
            Ok(()) => {}
            // Daemons before 1.17 report an invalid path as an error.
            Err(StoreError::Daemon(m)) if self.minor() < 17 && m.contains("is not valid") => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        if self.minor() >= 17 && self.int()? == 0 {
            return Ok(None);
        }
        let deriver = self.optional_path()?;
        let hash = self.string()?;
        let nar_hash = Sha256::parse_bare(&hash)
            .or_else(|_| hash.parse())
            .map_err(|e| proto(format!("daemon sent a bad narHash for {path}: {e}")))?;
        let references = self.paths()?;
        let registration_time = self.int()?;
        let nar_size = self.int()?;
        let (mut ultimate, mut sigs, mut ca) = (false, Vec::new(), None);
        if self.minor() >= 16 {
            ultimate = self.int()? != 0;
            // A signature the store holds but we cannot parse cannot be verified by anyone either;
            // dropping it loses nothing.
            sigs = self
                .strings()?
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect();
            ca = Some(self.string()?).filter(|s| !s.is_empty());
        }
        Ok(Some(PathInfo {
            path: path.clone(),
            deriver,
            nar_hash,
            nar_size,
            references,
            registration_time,
            ultimate,
            sigs,
            ca,
        }))
    }

    /// Every valid path in the store.
    pub fn query_all_valid_paths(&mut self) -> Result<Vec<StorePath>, StoreError> {
        self.request(OP_QUERY_ALL_VALID_PATHS, |_| Ok(()))?;
        self.paths()
    }

    pub fn query_valid_paths(&mut self, paths: &[StorePath]) -> Result<Vec<StorePath>, StoreError> {
        let minor = self.minor();
        self.request(OP_QUERY_VALID_PATHS, |c| {
            c.put(paths.len() as u64)?;
            for p in paths {
                c.put_str(&p.to_string())?;
            }
            if minor >= 27 {
                c.put(0)?; // do not substitute
            }
            Ok(())
        })?;
        self.paths()
    }

    /// Writes the path's NAR to `out` and returns its size. The daemon does not frame the NAR, so it
    /// is parsed as it streams, which also finds its end. Check validity first: for an invalid path
    /// the daemon's error would arrive in the middle of the byte stream.
    pub fn nar_from_path(
        &mut self,
        path: &StorePath,
        out: &mut dyn Write,
    ) -> Result<u64, StoreError> {
        self.request(OP_NAR_FROM_PATH, |c| c.put_str(&path.to_string()))?;
        let mut out = out;
        copy_nar(&mut self.r, &mut out).map_err(|e| StoreError::Nar {
            path: path.clone(),
            source: e,
        })
    }

    /// Output name → output path (`None` when not yet known, e.g. floating content-addressed).
    pub fn query_derivation_output_map(
        &mut self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>, StoreError> {
        if self.minor() < 22 {
            return Err(StoreError::UnsupportedVersion(self.version));
        }
        self.request(OP_QUERY_DERIVATION_OUTPUT_MAP, |c| {
            c.put_str(&drv.to_string())
        })?;
        let n = self.int()?;
        if n > MAX_LIST {
            return Err(proto(format!("map of {n} outputs from the daemon")));
        }
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let name = self.string()?;
            out.insert(name, self.optional_path()?);
        }
        Ok(out)
    }
}

/// Nix colours its error messages; ours are plain text.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_colours() {
        assert_eq!(
            super::strip_ansi("\x1b[31;1merror:\x1b[0m path"),
            "error: path"
        );
    }
}
