//! `scripts/install.sh`, as an operator runs it, into a temporary prefix: the installed programs run,
//! the unit passes `systemd-analyze verify`, a second run changes nothing, and `--uninstall` removes
//! what was installed and keeps the configuration and the queue.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn install(prefix: &Path, args: &[&str]) -> Output {
    let from = Path::new(env!("CARGO_BIN_EXE_nixpush")).parent().unwrap();
    let o = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .arg("--prefix")
        .arg(prefix)
        .arg("--from")
        .arg(from)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "install.sh {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Every file under `dir` with its size, mode and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, u32, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.insert(e.path(), (m.len(), m.mode(), m.mtime(), m.mtime_nsec()));
        }
    }
    out
}

#[test]
fn install_sh_installs_runs_changes_nothing_twice_and_uninstalls_keeping_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    let first = String::from_utf8(install(&prefix, &[]).stdout).unwrap();
    assert!(
        first.contains(&format!(
            "post-build-hook = {}/bin/nixpush-hook",
            prefix.display()
        )),
        "{first}"
    );

    // The installed nixpush names its version and commit.
    let version = nixpush_testbed::check(
        "nixpush --version",
        Command::new(prefix.join("bin/nixpush"))
            .arg("--version")
            .output()
            .unwrap(),
    );
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned())
        .unwrap_or_else(|| "commit unknown".into());
    assert_eq!(
        version.trim(),
        format!("nixpush {} ({commit})", env!("CARGO_PKG_VERSION"))
    );

    // The configuration is the commented example, with the queue inside the prefix.
    let config = prefix.join("etc/nixpush/nixpush.toml");
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains("# to = \"s3://"), "{text}");
    let state = prefix.join("var/lib/nixpush");
    assert!(
        text.contains(&format!("state-dir = \"{}\"", state.display())),
        "{text}"
    );
    assert!(state.is_dir());

    // The installed hook, reading the installed configuration, records a build in that queue (the
    // daemon is not running) and exits 0.
    let built = "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-installed";
    let hook = Command::new(prefix.join("bin/nixpush-hook"))
        .env("NIXPUSH_CONFIG", &config)
        .env("OUT_PATHS", built)
        .env_remove("DRV_PATH")
        .output()
        .unwrap();
    assert!(hook.status.success(), "{hook:?}");
    let items = nixpush_queue::Queue::open(&state).unwrap().items().unwrap();
    assert_eq!(
        items,
        vec![(built.to_owned(), nixpush_queue::State::Queued)]
    );

    let unit = prefix.join("lib/systemd/system/nixpush-daemon.service");
    let unit_text = fs::read_to_string(&unit).unwrap();
    assert!(unit_text.contains(&format!(
        "ExecStart={}/bin/nixpush daemon",
        prefix.display()
    )));
    assert!(unit_text.contains(&format!("Environment=NIXPUSH_CONFIG={}", config.display())));
    nixpush_testbed::check(
        "systemd-analyze verify",
        Command::new(nixpush_testbed::find_program("systemd-analyze"))
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap(),
    );

    let share = prefix.join("share");
    for f in [
        "bash-completion/completions/nixpush",
        "zsh/site-functions/_nixpush",
        "fish/vendor_completions.d/nixpush.fish",
    ] {
        let text = fs::read_to_string(share.join(f)).unwrap();
        assert!(
            text.contains("verify"),
            "{f} does not complete the commands"
        );
    }
    for page in ["nixpush.1", "nixpush-push.1", "nixpush-daemon.1"] {
        assert!(share.join("man/man1").join(page).is_file(), "{page}");
    }

    // A second run: nothing changes, not even a modification time.
    let before = snapshot(&prefix);
    let second = String::from_utf8(install(&prefix, &[]).stdout).unwrap();
    assert!(second.contains("nothing changed"), "{second}");
    assert_eq!(before, snapshot(&prefix));

    // An upgrade never replaces the configuration the operator edited.
    let edited = format!("{text}\nto = \"file:///srv/cache\"\n");
    fs::write(&config, &edited).unwrap();
    install(&prefix, &[]);
    assert_eq!(fs::read_to_string(&config).unwrap(), edited);

    // Uninstall keeps the configuration and the queue.
    install(&prefix, &["--uninstall"]);
    for gone in [
        prefix.join("bin/nixpush"),
        prefix.join("bin/nixpush-hook"),
        unit,
        share.join("bash-completion/completions/nixpush"),
        share.join("man/man1/nixpush.1"),
        share.join("nixpush/installed"),
    ] {
        assert!(!gone.exists(), "{} is still there", gone.display());
    }
    assert!(
        fs::read_to_string(&config)
            .unwrap()
            .ends_with("to = \"file:///srv/cache\"\n")
    );
    assert!(state.join("queue.sqlite").is_file());
}
