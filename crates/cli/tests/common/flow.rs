//! A builder as the hook workflow sees it: a private nix-daemon whose `post-build-hook` is
//! nixpush-hook, an S3 server, a configuration, and a `nixpush daemon` process to start and stop.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use nixpush_format::StorePath;
use nixpush_queue::{Queue, State};
use nixpush_testbed::{
    DaemonOptions, Fault, Faults, NixDaemon, Relay, RelayConfig, RequestMatch, S3Kind, S3Server,
    derivation,
};

pub const DEADLINE: Duration = Duration::from_secs(90);
/// Where Nix's collector looks for roots.
pub const GCROOTS: &str = "/nix/var/nix/gcroots";

pub struct Flow {
    pub s3: S3Server,
    pub nix: NixDaemon,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub public: String,
    pub daemon: Option<Child>,
    pub daemon_log: PathBuf,
    /// GC roots of queued items, where Nix's collector looks (removed with the test).
    pub roots: tempfile::TempDir,
    /// The nix-daemon's build logs (`NIX_LOG_DIR`), read by the nixpush commands: this test's
    /// builds only.
    pub build_logs: PathBuf,
}

pub fn hook_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nixpush-hook"))
}

/// Polls `cond` until it holds (the daemon announces nothing we could wait on), or panics with `what`.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Flow {
    pub fn new(url_params: &str) -> Flow {
        Self::with_hook(url_params, true)
    }

    pub fn with_hook(url_params: &str, hook: bool) -> Flow {
        Self::on(S3Kind::S3sFs, url_params, hook)
    }

    pub fn on(kind: S3Kind, url_params: &str, hook: bool) -> Flow {
        let dir = tempfile::tempdir().unwrap();
        let s3 = S3Server::start_kind(kind);
        let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
        let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args(["keygen", "flow-1"])
            .args([&sk, &pk])
            .output()
            .unwrap();
        assert!(o.status.success());
        let state = dir.path().join("state");
        let socket = dir.path().join("hook.sock");
        let config = dir.path().join("nixpush.toml");
        fs::create_dir_all(GCROOTS).unwrap();
        let roots = tempfile::Builder::new()
            .prefix("nixpush-test-")
            .tempdir_in(GCROOTS)
            .unwrap();
        fs::write(
            &config,
            format!(
                "to = \"{}\"\nsecret-key-files = [\"{}\"]\nstate-dir = \"{}\"\nsocket = \"{}\"\n\
                 retry-base-delay = 0.05\nretry-max-delay = 0.5\ngc-roots-dir = \"{}\"\n\
                 spill-dir = \"{}\"\n",
                s3.store_url(url_params),
                sk.display(),
                state.display(),
                socket.display(),
                roots.path().display(),
                dir.path().join("spill").display()
            ),
        )
        .unwrap();
        let build_logs = dir.path().join("nix-logs");
        let nix = NixDaemon::start_with(DaemonOptions {
            post_build_hook: hook.then(hook_bin),
            env: vec![
                ("NIXPUSH_CONFIG".into(), config.display().to_string()),
                ("NIX_LOG_DIR".into(), build_logs.display().to_string()),
            ],
            ..Default::default()
        });
        Flow {
            public: fs::read_to_string(&pk).unwrap(),
            daemon_log: dir.path().join("daemon.log"),
            s3,
            nix,
            dir,
            config,
            state,
            socket,
            daemon: None,
            roots,
            build_logs,
        }
    }

    /// Sends the daemon's requests through `relay`, with the store URL's parameters `params` (as
    /// the Flow was made with).
    pub fn route_through(&self, relay: &Relay, params: &str) {
        let config = fs::read_to_string(&self.config).unwrap().replace(
            &self.s3.store_url(params),
            &self.s3.store_url_at(&relay.endpoint, params),
        );
        fs::write(&self.config, config).unwrap();
    }

    /// Routes the daemon through a relay that answers the first three HeadBucket attempts (the
    /// first HEADs) 503 SlowDown with `Retry-After: retry_after`: as many as the SDK's own
    /// attempts at one request, so the daemon sees the throttling itself. Only HEADs: the read of
    /// `nix-cache-info` goes alongside the first attempt, and would take a fault of the three.
    pub fn throttled(&self, retry_after: u32) -> Relay {
        let relay = Relay::start(
            &self.s3.endpoint,
            RelayConfig {
                faults: Faults {
                    limit: Some(3),
                    retry_after_secs: retry_after,
                    only: Some(RequestMatch {
                        method: "HEAD".into(),
                        target_contains: String::new(),
                    }),
                    ..Faults::always(Fault::SlowDown)
                },
                // Each request on a connection of its own, so that the relay sees every HEAD.
                one_request_per_connection: true,
                ..RelayConfig::default()
            },
        );
        self.route_through(&relay, "");
        relay
    }

    /// Waits until the queue records an error that `matches` (attempts so far, error message).
    pub fn wait_for_error(&self, what: &str, matches: impl Fn(u32, &str) -> bool) {
        let start = Instant::now();
        loop {
            let status = Queue::open(&self.state).unwrap().status(10).unwrap();
            if status.recent_errors.iter().any(|e| matches(e.2, &e.3)) {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}: {status:?}\ndaemon log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Adds `lines` to the configuration file, for the daemon started next.
    pub fn configure(&self, lines: &str) {
        let mut config = fs::read_to_string(&self.config).unwrap();
        config.push_str(lines);
        fs::write(&self.config, config).unwrap();
    }

    /// Has the daemon serve its metrics, on a port it chooses (see [`Flow::scrape`]).
    pub fn serve_metrics(&self) {
        self.configure("metrics-listen = \"127.0.0.1:0\"\n");
    }

    /// The running daemon's metrics, scraped over HTTP and parsed.
    pub fn scrape(&self) -> prometheus_parse::Scrape {
        use std::io::{Read, Write};
        let addr = self
            .log()
            .lines()
            .find_map(|l| l.split("serving metrics addr=").nth(1).map(str::to_owned))
            .expect("the daemon says where it serves metrics");
        let mut conn = std::net::TcpStream::connect(addr.trim()).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        parse_metrics(response.split_once("\r\n\r\n").unwrap().1)
    }

    /// Turns GC roots off in the config (for tests of what happens when paths are collected).
    pub fn without_gc_roots(&self) {
        let config = fs::read_to_string(&self.config).unwrap().replace(
            &format!("gc-roots-dir = \"{}\"", self.roots.path().display()),
            "gc-roots-dir = \"\"",
        );
        fs::write(&self.config, config).unwrap();
    }

    /// What `nix-store --gc` would delete now (`--print-dead` marks exactly as a collection does,
    /// and deletes nothing: the store is shared with the other tests).
    pub fn dead(&self) -> BTreeSet<String> {
        self.nix
            .run("nix-store", &["--gc", "--print-dead"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn nixpush(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nixpush"));
        c.env("NIXPUSH_CONFIG", &self.config)
            .env("NIX_LOG_DIR", &self.build_logs)
            .envs(self.s3.credentials_env());
        c
    }

    pub fn start_daemon(&mut self) {
        self.start_daemon_with(&[]);
    }

    /// Starts the daemon with `env` added. With `WATCHDOG_USEC` in it, `WATCHDOG_PID` names the
    /// daemon itself, as systemd sets it (through a shell that execs the daemon: the PID stays).
    pub fn start_daemon_with(&mut self, env: &[(&str, &str)]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon_log)
            .unwrap();
        let mut command = self.nixpush();
        if env.iter().any(|(k, _)| *k == "WATCHDOG_USEC") {
            let program = command.get_program().to_owned();
            command = Command::new("/bin/sh");
            command
                .env("NIXPUSH_CONFIG", &self.config)
                .env("NIX_LOG_DIR", &self.build_logs)
                .envs(self.s3.credentials_env())
                .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
                .arg(program);
        }
        let mut child = command
            .args(["daemon", "--store", &self.nix.store_url()])
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let socket = self.socket.clone();
        wait_for("the daemon's socket", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("daemon exited ({status}): {}", self.log());
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        self.daemon = Some(child);
    }

    pub fn signal_daemon(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.daemon.take().expect("daemon running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    /// Builds `expr` through the daemon (so the hook runs); returns outputs and nix-build's stderr.
    pub fn build(&self, expr: &str) -> (Vec<String>, String) {
        // Through a file: one argument may not exceed 128 KiB (MAX_ARG_STRLEN).
        let file = self
            .dir
            .path()
            .join(format!("{}.nix", nixpush_testbed::unique("expr")));
        fs::write(&file, expr).unwrap();
        let o = self
            .nix
            .cmd("nix-build")
            .arg("--no-out-link")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "build failed: {err}");
        (
            String::from_utf8(o.stdout)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect(),
            err,
        )
    }

    pub fn published(&self, path: &str) -> bool {
        let h = path.parse::<StorePath>().unwrap().hash_part().to_owned();
        self.s3.served(&format!("{h}.narinfo"))
    }

    pub fn wait_published(&self, paths: &[String]) {
        let start = Instant::now();
        while !paths.iter().all(|p| self.published(p)) {
            if start.elapsed() > DEADLINE {
                let status = self.nixpush().args(["status"]).output().unwrap();
                panic!(
                    "not all published: {:?}\nstatus: {}\ndaemon log:\n{}",
                    paths
                        .iter()
                        .filter(|p| !self.published(p))
                        .collect::<Vec<_>>(),
                    String::from_utf8_lossy(&status.stdout),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn substitute_back(&self, roots: &[String], closure: &[String]) {
        // The daemon releases an item's GC roots just after recording it done, a moment after its
        // narinfo is visible; until then nix-store --delete refuses the paths as alive.
        wait_for("the GC roots of published items to be released", || {
            fs::read_dir(self.roots.path()).is_ok_and(|mut d| d.next().is_none())
        });
        let mut del = vec!["--delete"];
        del.extend(closure.iter().map(String::as_str));
        self.nix.run("nix-store", &del);
        let o = self
            .nix
            .cmd("nix-store")
            .arg("--realise")
            .args(roots)
            .args(["--option", "substituters", &self.s3.http_url])
            .args(["--option", "trusted-public-keys", &self.public])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "substitution failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        for p in closure {
            assert!(self.nix.is_valid(p), "{p} not substituted");
        }
    }

    pub fn queue_items(&self) -> Vec<(String, State)> {
        Queue::open(&self.state).unwrap().items().unwrap()
    }

    pub fn hook(&self, out_paths: Option<&std::ffi::OsStr>, drv: Option<&str>) -> Output {
        let mut c = Command::new(hook_bin());
        c.env("NIXPUSH_CONFIG", &self.config)
            .env_remove("OUT_PATHS")
            .env_remove("DRV_PATH");
        if let Some(o) = out_paths {
            c.env("OUT_PATHS", o);
        }
        if let Some(d) = drv {
            c.env("DRV_PATH", d);
        }
        c.output().unwrap()
    }
}

/// A test that ends (or fails) with the daemon running must not leave it behind: it would poll a
/// deleted state directory for as long as the machine runs.
impl Drop for Flow {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text format")
}

/// The value of the first sample of `metric` with these labels.
pub fn sample(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match &s.value {
            // The parser reads OpenMetrics-style `_total` samples as untyped.
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{metric}: {other:?}"),
        })
}

/// A list of `n` trivial derivations named `TAG-i`, as one Nix expression.
pub fn many(n: usize, tag: &str) -> String {
    let drvs: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "({})",
                derivation(&format!("{tag}-{i}"), "echo $name > $out")
            )
        })
        .collect();
    format!("[ {} ]", drvs.join(" "))
}
