//! The test bed shared by the command-line tests: a private nix-daemon, an S3 server and a key.
// Each test binary uses part of it.
#![allow(dead_code)]

use std::fs;
use std::process::{Child, Command, Output, Stdio};

use nixpush_testbed::{NixDaemon, S3Kind, S3Server};

/// Defines a test that runs once on each S3 server of the test bed, as `NAME::s3s_fs`,
/// `NAME::garage` and `NAME::moto`; `BODY` is called with the kind.
#[allow(unused_macros)]
macro_rules! on_every_server {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use nixpush_testbed::S3Kind;

            #[test]
            fn s3s_fs() {
                ($body)(S3Kind::S3sFs)
            }

            #[test]
            fn garage() {
                ($body)(S3Kind::Garage)
            }

            #[test]
            fn moto() {
                ($body)(S3Kind::Moto)
            }
        }
    };
}

/// A command's exit status and output, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts a command could not run (exit 2) and said `why`.
pub fn assert_refused(o: &Output, why: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", text(o));
    assert!(text(o).contains(why), "expected {why:?} in {}", text(o));
}

pub struct Bed {
    pub nix: NixDaemon,
    pub s3: S3Server,
    pub dir: tempfile::TempDir,
    pub secret: String,
    pub public: String,
}

impl Bed {
    /// A bed with s3s-fs, for what does not depend on the server.
    pub fn new() -> Self {
        Self::on(S3Kind::S3sFs)
    }

    pub fn on(kind: S3Kind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = (dir.path().join("sk"), dir.path().join("pk"));
        let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args(["keygen", "nixpush-test-1"])
            .args([&secret, &public])
            .output()
            .unwrap();
        assert!(o.status.success());
        Bed {
            nix: NixDaemon::start(),
            s3: S3Server::start_kind(kind),
            public: fs::read_to_string(&public).unwrap(),
            secret: secret.to_str().unwrap().to_owned(),
            dir,
        }
    }

    pub fn push(&self, to: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .arg("push")
            .args([
                "--store",
                &self.nix.store_url(),
                "--to",
                to,
                "--secret-key-file",
                &self.secret,
            ])
            .arg("--spool-dir")
            .arg(self.dir.path().join("push"))
            .args(args)
            .envs(self.s3.credentials_env())
            .env_remove("CI")
            .output()
            .unwrap()
    }

    /// `nixpush push` of `roots` to `to`, started and left running.
    pub fn spawn_push(&self, to: &str, roots: &[String], stderr: Stdio) -> Child {
        Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args(["push", "--store", &self.nix.store_url(), "--to", to])
            .args(["--secret-key-file", &self.secret])
            .args(roots)
            .envs(self.s3.credentials_env())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    /// `nixpush verify` of `store` with this bed's key.
    pub fn verify(&self, store: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args([
                "verify",
                "--store",
                store,
                "--trusted-public-key",
                &self.public,
            ])
            .args(args)
            .envs(self.s3.credentials_env())
            .env_remove("CI")
            .output()
            .unwrap()
    }

    pub fn push_ok(&self, to: &str, args: &[&str]) -> String {
        let o = self.push(to, args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "push failed ({}):\n{err}", o.status);
        err
    }

    /// Deletes the paths locally, then realises `roots` with `substituter` as the only source and
    /// our key as the only trusted one. Returns whether Nix succeeded, and its stderr.
    pub fn substitute(
        &self,
        substituter: &str,
        roots: &[String],
        closure: &[String],
    ) -> (bool, String) {
        let mut del = vec!["--delete"];
        del.extend(closure.iter().map(String::as_str));
        self.nix.run("nix-store", &del);
        for p in closure {
            assert!(!self.nix.is_valid(p), "{p} still valid after delete");
        }
        let o = self
            .nix
            .cmd("nix-store")
            .arg("--realise")
            .args(roots)
            .args(["--option", "substituters", substituter])
            .args(["--option", "trusted-public-keys", &self.public])
            .args(["--option", "narinfo-cache-negative-ttl", "0"])
            .args(["--option", "narinfo-cache-positive-ttl", "0"])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    pub fn narinfos(&self) -> Vec<String> {
        self.s3
            .keys()
            .into_iter()
            .filter(|k| k.ends_with(".narinfo"))
            .collect()
    }
}
pub mod flow;
