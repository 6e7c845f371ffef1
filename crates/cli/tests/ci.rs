//! CI runners: `nixpush wait` as the barrier before the runner is destroyed, `mark`, and what the
//! hook never sees (`enqueue`), against a real nix-daemon, a real `nixpush daemon` and s3s-fs.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use nixpush_queue::State;
use nixpush_testbed::{Fault, Faults, Relay, RelayConfig, derivation};

#[macro_use]
mod common;
use common::flow::*;
use common::{assert_refused, text};

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

/// The daemon is up but every request fails until the test lets them through: `wait`, started
/// right after the builds, must still be waiting then, and once it exits 0, every path built before
/// it must be in the bucket at that moment.
#[test]
fn wait_returns_once_everything_built_before_it_is_published() {
    let mut f = Flow::new("");
    let relay = Relay::start(
        &f.s3.endpoint,
        RelayConfig {
            faults: Faults::always(Fault::InternalError),
            ..RelayConfig::default()
        },
    );
    f.route_through(&relay, "");
    f.start_daemon();
    let (outs, _) = f.build(&many(6, "wait-all"));
    let summary = f.dir.path().join("summary.md");
    let wait = f
        .nixpush()
        .args(["wait", "--timeout", "120", "--json"])
        .env("GITHUB_STEP_SUMMARY", &summary)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    f.wait_for_error("an upload refused by the relay", |_, e| e.contains("500"));
    let mut wait = wait;
    assert!(
        wait.try_wait().unwrap().is_none(),
        "wait returned while nothing could be published"
    );
    relay.set_config(RelayConfig::default());
    let o = wait.wait_with_output().unwrap();
    // At the moment it returned: every build's outputs are in the bucket.
    let missing: Vec<_> = outs.iter().filter(|p| !f.published(p)).collect();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        missing.is_empty(),
        "wait returned 0 before {missing:?} were published"
    );
    let j = json(&o);
    assert_eq!(j["exit"], 0);
    // Nix 2.8 gives the hook no OUT_PATHS: the items are the derivations.
    assert_eq!(j["published"].as_array().unwrap().len(), 6, "{j}");
    let summary = std::fs::read_to_string(&summary).unwrap();
    assert!(summary.contains("6 published, 0 failed"), "{summary}");
}

/// `wait --since MARK` answers only for what was recorded after the mark; PATH arguments are
/// queued if they are not, and waited for.
#[test]
fn wait_since_a_mark_and_for_given_paths() {
    let mut f = Flow::new("");
    // Recorded before the mark, and never uploadable: the daemon is not running yet, and the path
    // is not in the store, so it ends as gone; a wait since the mark must not answer for it.
    let before = "/nix/store/00000000000000000000000000000000-not-built-here";
    let o = f.hook(Some(before.as_ref()), None);
    assert!(o.status.success());
    let mark = f.nixpush().arg("mark").output().unwrap();
    assert!(mark.status.success(), "{}", text(&mark));
    let mark = String::from_utf8(mark.stdout).unwrap().trim().to_owned();
    assert!(mark.starts_with("1@"), "{mark}");
    f.start_daemon();
    let (outs, _) = f.build(&many(2, "wait-since"));
    let o = f
        .nixpush()
        .args(["wait", "--timeout", "60", "--json", "--since", &mark])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let j = json(&o);
    let published: Vec<_> = j["published"].as_array().unwrap().iter().collect();
    assert_eq!(published.len(), 2, "{j}");
    assert!(!j.to_string().contains(before), "{j}");
    for p in &outs {
        assert!(f.published(p));
    }

    // A path no hook saw (added with nix-store --add): queued by wait itself, and published.
    let file = f.dir.path().join("added.txt");
    std::fs::write(&file, nixpush_testbed::unique("added")).unwrap();
    let added = f.nix.run("nix-store", &["--add", file.to_str().unwrap()]);
    let added = added.trim();
    assert!(!f.published(added));
    let o = f
        .nixpush()
        .args(["wait", "--timeout", "60", added])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(f.published(added));

    // Bad input: a clear error, exit 2.
    let o = f
        .nixpush()
        .args(["wait", "--since", "yesterday"])
        .output()
        .unwrap();
    assert_refused(&o, "not a mark");
}

/// The endpoint is dead: `wait --timeout 5` gives up at its deadline, exit 1, naming the item and
/// its last error; the item stays queued. `--best-effort` exits 0 with a warning.
#[test]
fn wait_at_a_dead_endpoint_names_what_is_not_published() {
    let mut f = Flow::new("");
    // Nothing listens on port 1.
    let config = std::fs::read_to_string(&f.config).unwrap().replace(
        &f.s3.store_url(""),
        &f.s3.store_url_at("http://127.0.0.1:1", ""),
    );
    std::fs::write(&f.config, config).unwrap();
    f.start_daemon();
    let (outs, err) = f.build(&derivation(
        &nixpush_testbed::unique("dead-end"),
        "echo $name > $out",
    ));
    assert!(err.contains("queued"), "{err}");
    let drv = f.queue_items()[0].0.clone();
    // The first attempt's error is recorded before `wait` begins: its 5 s are then not a race
    // with the SDK's attempts and their pauses.
    let dead = |e: &str| e.contains("127.0.0.1:1") || e.to_lowercase().contains("connect");
    f.wait_for_error("the first attempt to fail", |_, e| dead(e));
    let started = Instant::now();
    let o = f
        .nixpush()
        .args(["wait", "--timeout", "5", "--json"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("NOT PUBLISHED") && l.contains(&drv))
        .unwrap_or_else(|| panic!("the item is named: {}", text(&o)));
    assert!(dead(line), "with its last error: {line}");
    let j = json(&o);
    assert_eq!(j["not_published"][0]["path"], drv.as_str(), "{j}");
    assert!(!f.published(&outs[0]));
    let state = f.queue_items()[0].1;
    assert!(
        matches!(state, State::Queued | State::InFlight),
        "left queued for the daemon: {state:?}"
    );

    let o = f
        .nixpush()
        .args(["wait", "--timeout", "1", "--best-effort"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("WARNING"),
        "{}",
        text(&o)
    );
}

/// No daemon answers and the queue holds work: nothing can be uploaded, exit 2 (0 with
/// --best-effort). No queue at all, or a configuration that does not load: exit 2, saying why.
#[test]
fn wait_without_a_daemon_or_a_queue_cannot_run() {
    let f = Flow::new("");
    let o = f
        .nixpush()
        .args(["wait", "--timeout", "1"])
        .output()
        .unwrap();
    assert_refused(&o, "no queue");

    let (_, err) = f.build(&derivation(
        &nixpush_testbed::unique("no-daemon"),
        "echo $name > $out",
    ));
    assert!(err.contains("wrote the queue directly"), "{err}");
    let o = f
        .nixpush()
        .args(["wait", "--timeout", "1"])
        .output()
        .unwrap();
    assert_refused(&o, "no daemon answered");
    let o = f
        .nixpush()
        .args(["wait", "--timeout", "1", "--best-effort"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // A configuration that does not load: exit 2 naming it, 0 with --best-effort.
    let broken = f.dir.path().join("broken.toml");
    std::fs::write(&broken, "to = 3\n").unwrap();
    for (args, code) in [(&["wait"][..], 2), (&["wait", "--best-effort"][..], 0)] {
        let o = f
            .nixpush()
            .env("NIXPUSH_CONFIG", &broken)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(code), "{}", text(&o));
        assert!(text(&o).contains("broken.toml"), "{}", text(&o));
    }
}

/// Paths no hook saw: `enqueue --since MARK` queues what `nix-store --add` registered after the
/// mark and leaves out a path an upstream key signs; `enqueue --stdin --wait` acknowledges each
/// path with a JSON line once it is published.
#[test]
fn enqueue_queues_what_no_hook_saw() {
    let mut f = Flow::new("");
    let usk = f.dir.path().join("upstream.sk");
    let o = f
        .nixpush()
        .args(["keygen", "upstream-1"])
        .arg(&usk)
        .arg(f.dir.path().join("upstream.pk"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    f.configure("skip-signed-by = [\"upstream-1\"]\n");
    // The store is shared with the tests running alongside: --since finds their paths too, and
    // rooting them would keep them from the deletions those tests make.
    f.without_gc_roots();
    f.start_daemon();

    let mark = f.nixpush().arg("mark").output().unwrap();
    let mark = String::from_utf8(mark.stdout).unwrap().trim().to_owned();
    let add = |tag: &str| {
        let file = f.dir.path().join(tag);
        std::fs::write(&file, nixpush_testbed::unique(tag)).unwrap();
        f.nix
            .run("nix-store", &["--add", file.to_str().unwrap()])
            .trim()
            .to_owned()
    };
    let (ours, theirs) = (add("ours.txt"), add("theirs.txt"));
    f.nix.run(
        "nix",
        &[
            "store",
            "sign",
            "--key-file",
            usk.to_str().unwrap(),
            &theirs,
        ],
    );
    let o = f
        .nixpush()
        .args(["enqueue", "--since", &mark, "--store", &f.nix.store_url()])
        .args(["--wait", "--timeout", "60"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let acks: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        acks.iter()
            .any(|a| a["path"] == ours.as_str() && a["published"] == true),
        "{}",
        text(&o)
    );
    assert!(f.published(&ours));
    assert!(!f.published(&theirs), "signed by a skipped key");
    assert!(
        !f.queue_items().iter().any(|(p, _)| *p == theirs),
        "a path an upstream cache signs is not even queued"
    );

    let piped = add("piped.txt");
    let mut child = f
        .nixpush()
        .args(["enqueue", "--stdin", "--wait", "--timeout", "60"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{piped}\n").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let ack: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(ack["path"], piped.as_str());
    assert_eq!(ack["published"], true);
    assert!(f.published(&piped));

    let o = f
        .nixpush()
        .args(["enqueue", "/tmp/not-a-store-path"])
        .output()
        .unwrap();
    assert_refused(&o, "not-a-store-path");
}

/// A successful build's log goes to the cache after its outputs, where Nix 2.8's `nix log` reads
/// it through the narinfo's `Deriver`; a failed build's (no hook ran) goes with `wait --logs
/// failed`, and only one that failed after the mark.
#[test]
fn build_logs_reach_the_cache_and_nix_log_reads_them() {
    let mut f = Flow::new("");
    f.start_daemon();
    let o = f
        .nixpush()
        .args(["wait", "--logs", "failed"])
        .output()
        .unwrap();
    assert_refused(&o, "--logs needs --since");
    let fail = |tag: &str| {
        let said = nixpush_testbed::unique(tag);
        let expr = f.dir.path().join(format!("{tag}.nix"));
        std::fs::write(&expr, derivation(tag, &format!("echo {said}; exit 3"))).unwrap();
        let drv = f
            .nix
            .run("nix-instantiate", &[expr.to_str().unwrap()])
            .trim()
            .to_owned();
        let o = f
            .nix
            .cmd("nix-store")
            .args(["--realise", &drv])
            .output()
            .unwrap();
        assert!(!o.status.success(), "the build failed: {}", text(&o));
        (drv, said)
    };
    let (before, _) = fail("failed-before");
    let mark = f.nixpush().arg("mark").output().unwrap();
    let mark = String::from_utf8(mark.stdout).unwrap().trim().to_owned();

    let said = nixpush_testbed::unique("built-and-said");
    let (outs, _) = f.build(&derivation(
        "logged",
        &format!("echo {said}; echo done > $out"),
    ));
    let (drv, failing) = fail("failed-after");

    let wait = |logs: &str| {
        let o = f
            .nixpush()
            .args(["wait", "--timeout", "60", "--json", "--since", &mark])
            .args(["--logs", logs, "--store", &f.nix.store_url()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        json(&o)
    };
    let j = wait("failed");
    assert_eq!(
        j["logs"],
        serde_json::json!([{"drv": drv, "failed": true}]),
        "only the build that failed after the mark: {j}"
    );
    let key = |drv: &str| format!("log/{}", drv.rsplit('/').next().unwrap());
    let log = f.s3.get(&key(&drv)).expect("the failed build's log");
    assert!(
        String::from_utf8_lossy(&log).contains(&failing),
        "{}",
        String::from_utf8_lossy(&log)
    );
    assert!(f.s3.get(&key(&before)).is_none(), "failed before the mark");

    // `wait` returned once the item was done, and the daemon records it done only after its log.
    let info = f.nix.run("nix-store", &["--query", "--deriver", &outs[0]]);
    assert!(
        f.s3.get(&key(info.trim())).is_some(),
        "the build's log, by the daemon"
    );
    let o = std::process::Command::new(nixpush_testbed::find_program("nix"))
        .env("NIX_CONF_DIR", &f.nix.conf_dir)
        .env("XDG_CACHE_HOME", f.dir.path().join("xdg-cache"))
        .env_remove("NIX_REMOTE")
        .args(["log", "--store", &f.s3.http_url, &outs[0]])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&said),
        "nix log shows what the build printed: {}",
        text(&o)
    );

    // The failed build, as a developer who evaluated the same expression reads it: the derivation
    // is in their store, the log is not (this client reads the default log directory, not the
    // test's), and the cache is a substituter.
    let o = f
        .nix
        .cmd("nix")
        .args(["log", &drv, "--option", "substituters", &f.s3.http_url])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&failing),
        "nix log reads the failed build's log from the cache: {}",
        text(&o)
    );

    let j = wait("all");
    let drvs: Vec<&str> = j["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["drv"].as_str().unwrap())
        .collect();
    assert!(
        drvs.contains(&info.trim()) && drvs.contains(&drv.as_str()),
        "{j}"
    );
    assert!(!drvs.contains(&before.as_str()), "{j}");
}

/// `upload-logs = false`: published, and no log.
#[test]
fn upload_logs_false_uploads_none() {
    let mut f = Flow::new("");
    f.configure("upload-logs = false\n");
    f.start_daemon();
    let (outs, _) = f.build(&derivation("unlogged", "echo $name; echo done > $out"));
    f.wait_published(&outs);
    let o = f
        .nixpush()
        .args(["wait", "--timeout", "60"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read_dir(f.build_logs.join("drvs"))
            .unwrap()
            .next()
            .is_some(),
        "Nix kept a log"
    );
    assert!(
        !f.s3.keys().iter().any(|k| k.starts_with("log/")),
        "{:?}",
        f.s3.keys()
    );
}
