//! A private `nix-daemon` per test, and the Nix expressions tests build with it.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

use crate::{Guard, check, find_program, unique, wait_until};

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
            // Nix remembers binary caches by URL in ~/.cache/nix (that one exists, which narinfos
            // it lacks): a test's server on a port an earlier test used would inherit that, and
            // `nix copy` would skip writing nix-cache-info.
            .env("XDG_CACHE_HOME", self.dir.path().join("xdg-cache"))
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

    /// Waits until the daemon has no worker processes left, so that the temporary GC roots of the
    /// clients it served (a build that just returned, say) are released: until then the collector
    /// keeps their paths alive whatever else roots them.
    pub fn wait_idle(&self) {
        let pid = self.child.as_ref().expect("running").0.id();
        let workers = || {
            fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
                .filter(|stat| {
                    // ppid is the second field after the parenthesised command name.
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                        == Some(pid)
                })
                .count()
        };
        let start = std::time::Instant::now();
        while workers() > 0 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "nix-daemon workers still running after 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn is_valid(&self, store_path: &str) -> bool {
        self.cmd("nix-store")
            .args(["--check-validity", store_path])
            .status()
            .unwrap()
            .success()
    }
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
