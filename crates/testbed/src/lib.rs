//! The test bed every integration test shares: real Nix and a real S3 server, private to the test.
//!
//! - [`NixDaemon`]: Debian's `nix-daemon` with its own `NIX_CONF_DIR` (no sandbox, no substituters,
//!   optional `post-build-hook`) and its own socket. Clients reach it with `--store unix://SOCKET`.
//!   It shares `/nix/store` with the machine, so every derivation a test builds is made unique.
//! - [`S3Server`]: `s3s-fs` on a free loopback port with an access key and secret key, so SigV4 is
//!   really checked, plus a second, anonymous `s3s-fs` over the same data directory that Nix 2.8
//!   (which has no S3 support) substitutes from over plain HTTP.
//! - [`ThrottlingProxy`]: a relay in front of the S3 server that throttles the first connections
//!   the way S3 does, for what s3s-fs cannot do itself.
//!
//! Both are killed when dropped, so a failing test (which unwinds) still cleans up.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A process killed and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `ready` to hold, polling, unless the process exits first. Readiness of a freshly
/// spawned server is an event the server does not announce, so polling it is the only way.
fn wait_until(child: &mut Child, what: &str, log: &Path, mut ready: impl FnMut() -> bool) -> bool {
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
static RESERVED_PORTS: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The TCP port process `pid` listens on, from its socket inodes and /proc/net/tcp.
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: std::collections::HashSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
        let listening = f.get(3) == Some(&"0A") && f.get(9).is_some_and(|i| inodes.contains(*i));
        listening
            .then(|| u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok())
            .flatten()
    })
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

#[derive(Default)]
pub struct DaemonOptions {
    /// Absolute path of the program for `post-build-hook`.
    pub post_build_hook: Option<PathBuf>,
    /// Extra environment for the daemon (and so for the hook it runs).
    pub env: Vec<(String, String)>,
    /// Extra nix.conf lines.
    pub extra_conf: String,
}

pub struct NixDaemon {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub conf_dir: PathBuf,
    child: Option<Guard>,
    options_env: Vec<(String, String)>,
}

impl NixDaemon {
    pub fn start() -> Self {
        Self::start_with(DaemonOptions::default())
    }

    pub fn start_with(opts: DaemonOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-nix-")
            .tempdir()
            .unwrap();
        let conf_dir = dir.path().join("conf");
        fs::create_dir(&conf_dir).unwrap();
        let mut conf = String::from(
            "build-users-group =\nsandbox = false\nsubstituters =\n\
             experimental-features = nix-command\nrequire-sigs = true\n",
        );
        if let Some(hook) = &opts.post_build_hook {
            conf.push_str(&format!("post-build-hook = {}\n", hook.display()));
        }
        conf.push_str(&opts.extra_conf);
        fs::write(conf_dir.join("nix.conf"), conf).unwrap();
        let mut d = NixDaemon {
            socket: dir.path().join("daemon.sock"),
            conf_dir,
            dir,
            child: None,
            options_env: opts.env,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = self.dir.path().join("daemon.log");
        let mut child = Command::new(find_program("nix-daemon"))
            .env("NIX_CONF_DIR", &self.conf_dir)
            .env("NIX_DAEMON_SOCKET_PATH", &self.socket)
            .envs(self.options_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("cannot start nix-daemon");
        let sock = self.socket.clone();
        assert!(wait_until(&mut child, "nix-daemon", &log, || {
            UnixStream::connect(&sock).is_ok()
        }));
        self.child = Some(Guard(child));
    }

    /// `unix://SOCKET`, the store URL clients use.
    pub fn store_url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A Nix client command (`nix-build`, `nix-store`, `nix`) aimed at this daemon.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(find_program(program));
        c.env("NIX_CONF_DIR", &self.conf_dir)
            .env_remove("NIX_REMOTE")
            .arg("--store")
            .arg(self.store_url());
        c
    }

    /// Runs a client command and returns its stdout, panicking with its stderr on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.cmd(program).args(args).output().unwrap();
        check(&format!("{program} {}", args.join(" ")), out)
    }

    /// Builds a Nix expression and returns the output paths, one per line of `nix-build`.
    pub fn build(&self, expr: &str) -> Vec<String> {
        self.run("nix-build", &["--no-out-link", "-E", expr])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Adds a filesystem tree to the store as `nix-store --add` does.
    pub fn add(&self, path: &Path) -> String {
        self.run("nix-store", &["--add", path.to_str().unwrap()])
            .trim()
            .to_owned()
    }

    /// The closure of `roots` as `nix-store --query --requisites` reports it.
    pub fn requisites(&self, roots: &[String]) -> Vec<String> {
        let mut args = vec!["--query", "--requisites"];
        args.extend(roots.iter().map(String::as_str));
        self.run("nix-store", &args)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Builds [`with_dependency`]'s pair and returns (dependent, dependency) output paths.
    pub fn build_pair(&self, dep_name: &str, dep_script: &str, top: &str) -> (String, String) {
        let top = self.build(&with_dependency(dep_name, dep_script, top))[0].clone();
        let dep = self
            .requisites(std::slice::from_ref(&top))
            .into_iter()
            .find(|p| p.ends_with(dep_name));
        let dep = dep.expect("the dependency is in the closure");
        (top, dep)
    }

    pub fn delete(&self, store_path: &str) {
        self.run("nix-store", &["--delete", store_path]);
    }

    pub fn is_valid(&self, store_path: &str) -> bool {
        self.cmd("nix-store")
            .args(["--check-validity", store_path])
            .status()
            .unwrap()
            .success()
    }
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

/// Nix source for a derivation built by `/bin/sh` with coreutils on PATH (there is no sandbox and no
/// nixpkgs). `deps` are Nix expressions whose outputs the script may use; a reference to a
/// dependency is made by writing its path into the output.
pub fn derivation(name: &str, script: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         PATH = \"/usr/bin:/bin\"; nonce = \"{}\"; args = [ \"-c\" {} ]; }}",
        unique("n"),
        nix_string(script)
    )
}

/// An expression for a derivation `top` whose output references the output of `dep_name` (built by
/// `dep_script`): the smallest closure with an edge in it.
pub fn with_dependency(dep_name: &str, dep_script: &str, top: &str) -> String {
    format!(
        "let dep = {}; in {}",
        derivation(dep_name, dep_script),
        derivation(top, "echo ${dep} > $out").replace("\\${dep}", "${dep}")
    )
}

/// A Nix string literal (`''…''` would also interpret `${`; a quoted string escapes it).
pub fn nix_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '$' => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An expression for a chain `c -> b -> a` and a diamond `top -> {left, right} -> bottom`, as a list of
/// the two roots. Each output has a file, an executable, a symlink and an empty directory.
pub fn chain_and_diamond() -> String {
    let body = |refs: &str| {
        format!(
            "mkdir -p $out/bin $out/empty && echo {refs} > $out/refs && \
             printf '#!/bin/sh\\necho hi\\n' > $out/bin/hello && chmod +x $out/bin/hello && \
             ln -s bin/hello $out/link"
        )
    };
    let drv = |name: &str, deps: &[&str]| {
        let refs: Vec<String> = deps.iter().map(|d| format!("${{{d}}}")).collect();
        derivation(name, &body(&refs.join(" "))).replace("\\${", "${")
    };
    format!(
        "let a = {}; b = {}; c = {}; bottom = {}; left = {}; right = {}; top = {}; in [ c top ]",
        drv("chain-a", &[]),
        drv("chain-b", &["a"]),
        drv("chain-c", &["b"]),
        drv("diamond-bottom", &[]),
        drv("diamond-left", &["bottom"]),
        drv("diamond-right", &["bottom"]),
        drv("diamond-top", &["left", "right"]),
    )
}

pub struct S3Server {
    pub dir: TempDir,
    /// `ROOT`: objects live at `ROOT/BUCKET/KEY`.
    pub root: PathBuf,
    pub bucket: String,
    /// `http://127.0.0.1:PORT`, SigV4 required.
    pub endpoint: String,
    /// `http://127.0.0.1:PORT/BUCKET`, anonymous reads: what Nix substitutes from.
    pub http_url: String,
    pub access_key: String,
    pub secret_key: String,
    signed: Option<Guard>,
    signed_port: u16,
    _anonymous: Guard,
}

impl S3Server {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-s3-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("data");
        let bucket = "cache".to_owned();
        fs::create_dir_all(root.join(&bucket)).unwrap();
        let (access_key, secret_key) = ("nixpush-test-key".to_owned(), unique("secret"));
        let (signed, signed_port) =
            Self::spawn(&root, dir.path(), Some((&access_key, &secret_key)), None);
        let (anonymous, anon_port) = Self::spawn(&root, dir.path(), None, None);
        S3Server {
            endpoint: format!("http://127.0.0.1:{signed_port}"),
            http_url: format!("http://127.0.0.1:{anon_port}/{bucket}"),
            dir,
            root,
            bucket,
            access_key,
            secret_key,
            signed: Some(signed),
            signed_port,
            _anonymous: anonymous,
        }
    }

    /// Starts s3s-fs on `port`, or on a port the kernel picks. Readiness and ownership are read from
    /// /proc: a connect alone could reach another test's server that took the port first.
    fn spawn(
        root: &Path,
        dir: &Path,
        keys: Option<(&str, &str)>,
        port: Option<u16>,
    ) -> (Guard, u16) {
        let s3s = find_program("s3s-fs");
        for attempt in 0..10 {
            let log = dir.join(format!("s3s-{}-{attempt}.log", port.unwrap_or(0)));
            let mut cmd = Command::new(&s3s);
            cmd.args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.unwrap_or(0).to_string(),
            ]);
            if let Some((ak, sk)) = keys {
                cmd.args(["--access-key", ak, "--secret-key", sk]);
            }
            let mut child = cmd
                .arg(root)
                .stdin(Stdio::null())
                .stdout(fs::File::create(&log).unwrap())
                .stderr(Stdio::from(
                    fs::File::options().append(true).open(&log).unwrap(),
                ))
                .spawn()
                .expect("cannot start s3s-fs");
            let pid = child.id();
            let mut bound = None;
            if !wait_until(&mut child, "s3s-fs", &log, || {
                bound = listening_port(pid);
                bound.is_some()
            }) {
                continue;
            }
            let bound = bound.expect("set by the readiness check");
            let mut reserved = RESERVED_PORTS.lock().unwrap();
            if port.is_none() && reserved.contains(&bound) {
                // A paused server of another test owns this port until it resumes.
                drop(reserved);
                let _ = child.kill();
                let _ = child.wait();
                continue;
            }
            reserved.insert(bound);
            return (Guard(child), bound);
        }
        panic!("s3s-fs would not start");
    }

    /// The SigV4 endpoint goes down (the anonymous reader stays up); [`S3Server::resume`] brings it
    /// back on the same port.
    pub fn pause(&mut self) {
        self.signed = None;
    }

    pub fn resume(&mut self) {
        let keys = (self.access_key.as_str(), self.secret_key.as_str());
        let (g, _) = Self::spawn(
            &self.root,
            self.dir.path(),
            Some(keys),
            Some(self.signed_port),
        );
        self.signed = Some(g);
    }

    /// `s3://BUCKET?endpoint=…&region=us-east-1` plus `params` (`&`-joined, may be empty).
    pub fn store_url(&self, params: &str) -> String {
        let sep = if params.is_empty() { "" } else { "&" };
        format!(
            "s3://{}?endpoint={}&region=us-east-1{sep}{params}",
            self.bucket, self.endpoint
        )
    }

    /// The environment that gives the AWS credential chain this server's keys, and nothing else.
    pub fn credentials_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_CONFIG_FILE", "/nonexistent".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    pub fn object(&self, key: &str) -> PathBuf {
        self.root.join(&self.bucket).join(key)
    }

    /// Every object key in the bucket, sorted.
    pub fn keys(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let mut out = Vec::new();
        let base = self.root.join(&self.bucket);
        walk(&base, &base, &mut out);
        // s3s-fs keeps upload state and metadata beside the objects; those are not objects.
        out.retain(|k| !k.starts_with(".") && !k.contains("/.") && !k.ends_with(".metadata.json"));
        out.sort();
        out
    }
}

/// A loopback TCP relay in front of a real S3 server that answers the first `throttle` connections
/// itself, the way S3 throttles (503 `SlowDown` with `Retry-After`), and relays every later one
/// untouched, so SigV4 is still checked by the server behind it. s3s-fs never throttles; this is
/// how the daemon's handling of throttling meets a real client stack.
pub struct ThrottlingProxy {
    /// `http://127.0.0.1:PORT`, to use as the S3 endpoint.
    pub endpoint: String,
    /// When each connection arrived, and whether it was throttled.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<(Instant, bool)>>>,
}

impl ThrottlingProxy {
    pub fn start(upstream: &str, throttle: usize, retry_after_secs: u32) -> Self {
        use std::net::{TcpListener, TcpStream};
        use std::sync::{Arc, Mutex};

        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
        let record = log.clone();
        // The thread lives as long as the test process; connections end when either side closes.
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                let Ok(mut client) = client else { continue };
                let throttled = n < throttle;
                record.lock().unwrap().push((Instant::now(), throttled));
                if throttled {
                    std::thread::spawn(move || {
                        let _ = slow_down(&mut client, retry_after_secs);
                    });
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                relay(client, server);
            }
        });
        ThrottlingProxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
        }
    }
}

/// Reads one request (head and `Content-Length` body, so the client is not cut off mid-send) and
/// answers it as S3 does when throttling.
fn slow_down(client: &mut std::net::TcpStream, retry_after_secs: u32) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut left = (head_end + length).saturating_sub(buf.len());
    while left > 0 {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        left = left.saturating_sub(n);
    }
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                <Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
    write!(
        client,
        "HTTP/1.1 503 Slow Down\r\nRetry-After: {retry_after_secs}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    client.flush()
}

/// Copies bytes both ways until each side closes its half.
fn relay(client: std::net::TcpStream, server: std::net::TcpStream) {
    for (mut from, mut to) in [
        (client.try_clone().unwrap(), server.try_clone().unwrap()),
        (server, client),
    ] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}
