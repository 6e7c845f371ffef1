//! The post-build-hook workflow end to end: a real nix-daemon whose `post-build-hook` is
//! nixpush-hook, a real `nixpush daemon` process, and s3s-fs checking SigV4.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nixpush_format::{NarInfo, StorePath};
use nixpush_queue::{Queue, State};
use nixpush_testbed::{
    BucketClient, Fault, Faults, Relay, RelayConfig, S3Kind, derivation, with_dependency,
};

#[macro_use]
mod common;

use common::flow::*;

on_every_server!(
    twenty_builds_with_the_daemon_running_are_published_and_substitutable,
    twenty_builds
);
fn twenty_builds(kind: S3Kind) {
    let mut f = Flow::on(kind, "", true);
    f.start_daemon();
    let (outs, log) = f.build(&many(20, "twenty"));
    assert_eq!(outs.len(), 20);
    // Nix 2.8 gives the hook an empty OUT_PATHS: every output comes from resolving DRV_PATH.
    assert_eq!(
        log.matches("nixpush-hook: queued the outputs of").count(),
        20,
        "{log}"
    );
    assert!(log.contains("(daemon)"), "{log}");
    f.wait_published(&outs);
    // The twenty items, pushed within minutes, share one session record, which names them all.
    let sessions: Vec<String> =
        f.s3.keys()
            .into_iter()
            .filter(|k| k.starts_with("nixpush/sessions/"))
            .collect();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let session: serde_json::Value =
        serde_json::from_slice(&f.s3.get(&sessions[0]).unwrap()).unwrap();
    for out in &outs {
        let hash = &out.trim_start_matches("/nix/store/")[..32];
        assert!(
            session["paths"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == hash),
            "{out} is not in {session}"
        );
    }
    let closure = f.nix.requisites(&outs);
    f.substitute_back(&outs, &closure);
    // SIGTERM: a clean stop.
    assert!(f.signal_daemon(libc::SIGTERM).success(), "{}", f.log());
    assert!(!f.socket.exists());
    assert!(f.queue_items().iter().all(|(_, s)| *s == State::Done));
}

on_every_server!(
    builds_succeed_with_the_daemon_down_and_are_published_once_it_starts,
    daemon_down_then_up
);
fn daemon_down_then_up(kind: S3Kind) {
    let mut f = Flow::on(kind, "", true);
    let (outs, log) = f.build(&many(5, "down"));
    assert_eq!(log.matches("wrote the queue directly").count(), 5, "{log}");
    assert_eq!(f.queue_items().len(), 5);
    assert!(outs.iter().all(|p| !f.published(p)));
    f.start_daemon();
    f.wait_published(&outs);
    assert!(f.signal_daemon(libc::SIGTERM).success());
}

/// (nice, I/O priority) of a process (its first thread), as the kernel has them.
fn priorities(pid: u32) -> (i64, i64) {
    thread_priorities(pid, pid)
}

/// (nice, I/O priority) of the thread `tid` of process `pid`.
fn thread_priorities(pid: u32, tid: u32) -> (i64, i64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // Field 19 is the nice value; fields are counted after the parenthesised command name.
    let nice = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(16)
        .unwrap();
    // SAFETY: ioprio_get only reads the scheduling attributes of a process.
    let io = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, tid as libc::c_int) };
    (nice.parse().unwrap(), io)
}

/// The threads of process `pid` named `name`.
fn threads_named(pid: u32, name: &str) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .filter(|tid: &u32| {
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|comm| comm.trim() == name)
        })
        .collect()
}

/// The daemon yields to builds: nice 10 and the lowest best-effort I/O priority, unless told not to.
/// Its intake, which the hooks (and so the builds) wait for, keeps the priority it started with.
#[test]
fn the_daemon_yields_to_builds_unless_told_not_to() {
    let mut f = Flow::with_hook("", false);
    f.start_daemon();
    let pid = f.daemon.as_ref().unwrap().id();
    assert_eq!(priorities(pid), (10, (2 << 13) | 7));
    // After a build is hooked and published, the queue has been written for the hook and by the
    // worker: on the intake's thread and on blocking threads it started, all at the priority the
    // daemon started with.
    let (outs, _) = f.build(&derivation("intake-priority", "echo x > $out"));
    assert!(
        f.hook(Some(std::ffi::OsStr::new(&outs[0])), None)
            .status
            .success()
    );
    f.wait_published(&outs);
    let own = thread_priorities(std::process::id(), std::process::id());
    let intake = threads_named(pid, "nixpush-intake");
    assert!(
        intake.len() >= 2,
        "the intake's thread and its blocking threads: {intake:?}"
    );
    for tid in intake {
        assert_eq!(thread_priorities(pid, tid), own, "thread {tid}");
    }
    assert!(f.signal_daemon(libc::SIGTERM).success());
    f.configure("yield-to-builds = false\n");
    f.start_daemon();
    let pid = f.daemon.as_ref().unwrap().id();
    // What it was started with: this test's own.
    assert_eq!(priorities(pid).0, priorities(std::process::id()).0);
}

/// Ten builds sharing one dependency, each hooked after the last was published: the dependency is
/// asked about once, not once per build (the daemon remembers what the cache holds), and each
/// build's own path once.
#[test]
fn a_dependency_every_build_shares_is_probed_once() {
    let mut f = Flow::with_hook("", false);
    f.serve_metrics();
    let dep = derivation("shared-dep", "echo dep > $out");
    let tops: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "({})",
                derivation(&format!("top-{i}"), "echo ${dep} > $out").replace("\\${dep}", "${dep}")
            )
        })
        .collect();
    let (outs, _) = f.build(&format!("let dep = {dep}; in [ {} ]", tops.join(" ")));
    assert_eq!(outs.len(), 10);
    f.start_daemon();
    for p in &outs {
        assert!(f.hook(Some(std::ffi::OsStr::new(p)), None).status.success());
        f.wait_published(std::slice::from_ref(p));
    }
    let m = f.scrape();
    let heads: f64 = ["2xx", "4xx"]
        .iter()
        .filter_map(|o| {
            sample(
                &m,
                "nixpush_s3_requests_total",
                &[("operation", "HeadObject"), ("outcome", o)],
            )
        })
        .sum();
    assert_eq!(heads, 11.0, "HEADs for 10 builds and their one dependency");
}

/// A large upload crawls through a throttled uplink while small builds finish one by one: each
/// small one is published within seconds of its build, while the large one is still uploading.
#[test]
fn small_builds_are_published_while_a_large_upload_is_in_flight() {
    let mut f = Flow::new("");
    let relay = Relay::start(
        &f.s3.endpoint,
        RelayConfig {
            upstream_bytes_per_sec: Some(1 << 20),
            ..RelayConfig::default()
        },
    );
    f.route_through(&relay, "");
    f.start_daemon();
    // 64 MiB of noise: a minute at 1 MiB/s, whatever the compressor does.
    let (large, _) = f.build(&derivation("large", "head -c 67108864 /dev/urandom > $out"));
    let start = Instant::now();
    // The hook of Nix 2.8 names the derivation; the log line, the item.
    while !f
        .log()
        .lines()
        .any(|l| l.contains(" pushing ") && l.contains("-large"))
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the large upload did not start:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    for i in 0..10 {
        let (small, _) = f.build(&derivation(&format!("small-{i}"), "echo $name > $out"));
        let built = Instant::now();
        while !f.published(&small[0]) {
            assert!(
                built.elapsed() < Duration::from_secs(3),
                "small build {i} not published 3 s after its build\ndaemon log:\n{}",
                f.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        assert!(
            !f.published(&large[0]),
            "the large path finished before small build {i}"
        );
    }
    // The uplink opens: the large one goes up too.
    relay.set_config(RelayConfig::default());
    f.wait_published(&large);
}

/// As systemd runs it (`Type=notify`, a watchdog, JSON logs asked for): the daemon says it is
/// ready once its socket accepts, pings the watchdog while it runs, says it is stopping on SIGTERM,
/// and every line it logs is a JSON object.
#[test]
fn under_systemd_the_daemon_notifies_and_logs_json_lines() {
    let mut f = Flow::with_hook("", false);
    let notify_path = f.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    // Read as they come, as systemd does: a socket holds ten unread datagrams, and the daemon's
    // eleventh ping would block it.
    let (sent, notifications) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = notify.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
            if sent.send(message).is_err() {
                return;
            }
        }
    });
    let next = |f: &Flow| {
        notifications
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no notification ({e}); daemon log:\n{}", f.log()))
    };
    f.start_daemon_with(&[
        ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
        ("NIXPUSH_LOG_FORMAT", "json"),
    ]);
    // start_daemon returned once the socket accepted: READY came before any ping.
    assert_eq!(next(&f), "READY=1");
    assert_eq!(next(&f), "WATCHDOG=1");
    assert_eq!(next(&f), "WATCHDOG=1");
    let (outs, _) = f.build(&many(2, "systemd"));
    for p in &outs {
        assert!(f.hook(Some(std::ffi::OsStr::new(p)), None).status.success());
    }
    f.wait_published(&outs);
    assert!(f.signal_daemon(libc::SIGTERM).success());
    let mut rest = Vec::new();
    while let Ok(message) = notifications.recv_timeout(Duration::from_secs(30)) {
        let stopping = message == "STOPPING=1";
        rest.push(message);
        if stopping {
            break;
        }
    }
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
    let log = f.log();
    let mut uploaded = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "uploaded" {
            uploaded += 1;
            assert!(v["fields"]["path"].as_str().is_some(), "{line}");
        }
    }
    assert_eq!(uploaded, 2, "{log}");
}

/// Builds hooked one after another within `gather` wait for its end: none is claimed while the
/// window runs, past the worker's 1 s poll. `nixpush wait` does not wait for the window: it would
/// time out (30 s) long before the window (60 s) ends.
#[test]
fn builds_hooked_within_the_gather_window_are_claimed_together() {
    let mut f = Flow::with_hook("", false);
    f.configure("gather = 60\n");
    let (outs, _) = f.build(&many(6, "gathered"));
    let (first, outs) = outs.split_first().unwrap();
    f.start_daemon();
    // One build first, and `wait` for it, which ends its window: the daemon is past the claim of
    // its start, which could take any build hooked meanwhile.
    assert!(
        f.hook(Some(std::ffi::OsStr::new(first)), None)
            .status
            .success()
    );
    let waited = |f: &Flow| {
        let o = f
            .nixpush()
            .args(["wait", "--timeout", "30"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            f.log()
        );
    };
    waited(&f);
    assert!(f.published(first));
    for p in outs {
        assert!(f.hook(Some(std::ffi::OsStr::new(p)), None).status.success());
    }
    // A poll that came as the first of them arrived, before the window opened, may have claimed
    // what was queued by then; nothing after.
    let claimed = |f: &Flow| -> Vec<String> {
        let items = f.queue_items();
        assert_eq!(items.len(), 6);
        items
            .into_iter()
            .filter(|(item, s)| item != first && *s != State::Queued)
            .map(|(item, _)| item)
            .collect()
    };
    let before = claimed(&f);
    let last = outs.last().unwrap();
    assert!(!before.contains(last), "claimed as they came: {before:?}");
    // Watched for longer than the poll, whose claims must wait for the window too.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_millis(2500) {
        assert_eq!(
            claimed(&f),
            before,
            "claimed before the window was over:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    waited(&f);
    for p in outs {
        assert!(f.published(p), "{p} not published after the wait");
    }
}

/// With a short `keep-finished`, items published or gone are pruned from the queue.
#[test]
fn finished_items_are_pruned_after_keep_finished() {
    let mut f = Flow::with_hook("", false);
    f.configure("keep-finished = 0.2\n");
    let (outs, _) = f.build(&many(3, "pruned"));
    let joined = outs.join(" ");
    assert!(
        f.hook(Some(std::ffi::OsStr::new(&joined)), None)
            .status
            .success()
    );
    // Not in the store: ends gone, and is pruned too.
    let missing = "/nix/store/00000000000000000000000000000000-pruned-missing";
    assert!(
        f.hook(Some(std::ffi::OsStr::new(missing)), None)
            .status
            .success()
    );
    assert_eq!(f.queue_items().len(), 4);
    f.start_daemon();
    f.wait_published(&outs);
    // The daemon logs the pruning after its transaction commits: a queue found empty may come
    // before the line.
    wait_for(
        "the finished items to be pruned, and the daemon to say so",
        || f.queue_items().is_empty() && f.log().contains("pruned finished items from the queue"),
    );
}

/// SIGTERM while a large upload crawls: the daemon waits `stop-timeout` for it, then puts it back
/// in the queue with no attempt counted and exits 0; the next start publishes it.
#[test]
fn a_stop_waits_stop_timeout_then_leaves_the_rest_queued() {
    let mut f = Flow::with_hook("", false);
    let relay = Relay::start(
        &f.s3.endpoint,
        RelayConfig {
            upstream_bytes_per_sec: Some(256 << 10),
            ..RelayConfig::default()
        },
    );
    f.route_through(&relay, "");
    f.configure("stop-timeout = 0.5\n");
    // 16 MiB at 256 KiB/s: a minute, far beyond the stop's half second.
    let (large, _) = f.build(&derivation(
        "stopped",
        "head -c 16777216 /dev/urandom > $out",
    ));
    assert!(
        f.hook(Some(std::ffi::OsStr::new(&large[0])), None)
            .status
            .success()
    );
    f.start_daemon();
    wait_for("the upload to be under way", || {
        f.log().lines().any(|l| l.contains(" pushing "))
    });
    assert!(f.signal_daemon(libc::SIGTERM).success(), "{}", f.log());
    let log = f.log();
    assert!(
        log.contains("stopped before these were published; they stay queued items=1"),
        "{log}"
    );
    assert!(!f.published(&large[0]));
    let status = Queue::open(&f.state).unwrap().status(10).unwrap();
    assert!(status.counts.contains(&(State::Queued, 1)), "{status:?}");
    assert!(
        status.recent_errors.is_empty(),
        "an attempt was counted: {status:?}"
    );
    relay.set_config(RelayConfig::default());
    f.start_daemon();
    f.wait_published(&large);
}

/// An item whose closure cannot be computed (the store's record of its path is damaged: the
/// nix-daemon answers with an error) fails its own attempts only: the items hooked with it are
/// published with no failed attempt counted, and it is published once the record is repaired.
#[test]
fn an_item_whose_closure_cannot_be_computed_is_retried_alone() {
    let mut f = Flow::with_hook("", false);
    let (outs, _) = f.build(&many(3, "alone"));
    let (damaged, _) = f.build(&derivation("damaged", "echo $name > $out"));
    let damaged = damaged[0].clone();
    // The store's own database, shared with the other tests: only this test's path is touched,
    // and its record is put back before the test ends.
    let db = rusqlite::Connection::open("/nix/var/nix/db/db.sqlite").unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    let hash: String = db
        .query_row(
            "SELECT hash FROM ValidPaths WHERE path = ?1",
            [&damaged],
            |r| r.get(0),
        )
        .unwrap();
    let set_hash = |h: &str| {
        let n = db
            .execute(
                "UPDATE ValidPaths SET hash = ?1 WHERE path = ?2",
                [h, damaged.as_str()],
            )
            .unwrap();
        assert_eq!(n, 1);
    };
    set_hash("sha256:damaged");
    assert!(
        f.hook(Some(std::ffi::OsStr::new(&damaged)), None)
            .status
            .success()
    );
    let joined = outs.join(" ");
    assert!(
        f.hook(Some(std::ffi::OsStr::new(&joined)), None)
            .status
            .success()
    );
    f.start_daemon();
    f.wait_published(&outs);
    f.wait_for_error("the damaged path to be retried", |attempts, error| {
        attempts >= 2 && error.contains("damaged")
    });
    let status = Queue::open(&f.state).unwrap().status(100).unwrap();
    let errored: BTreeSet<&str> = status.recent_errors.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(errored, BTreeSet::from([damaged.as_str()]), "{status:?}");
    wait_for("the good items to be recorded done", || {
        let items = f.queue_items();
        outs.iter()
            .all(|o| items.iter().any(|(n, s)| n == o && *s == State::Done))
    });
    set_hash(&hash);
    f.wait_published(std::slice::from_ref(&damaged));
}

#[test]
fn an_endpoint_outage_delays_uploads_and_loses_nothing() {
    let mut f = Flow::new("");
    f.start_daemon();
    f.s3.pause();
    let (outs, _) = f.build(&many(4, "outage"));
    // The daemon has tried and failed at least twice while the endpoint was down.
    f.wait_for_error("failed attempts to be recorded", |attempts, error| {
        attempts >= 2 && error.contains("cannot reach")
    });
    assert!(outs.iter().all(|p| !f.published(p)));
    // Monitoring sees the backlog age; nothing has failed.
    let check = f
        .nixpush()
        .args(["status", "--check", "--max-age", "1ms"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the oldest pending item is") && !err.contains("failed"),
        "{err}"
    );
    f.s3.resume();
    f.wait_published(&outs);
    // The daemon records an item done just after publishing it.
    wait_for("every item to be recorded done", || {
        f.queue_items().iter().all(|(_, s)| *s == State::Done)
    });
}

#[test]
fn throttling_is_retried_after_the_servers_retry_after() {
    let mut f = Flow::with_hook("", false);
    // Retry-After: 3, more than the SDK's own attempts at one request (3).
    let relay = f.throttled(3);
    let config = fs::read_to_string(&f.config)
        .unwrap()
        .replace("retry-max-delay = 0.5", "retry-max-delay = 10");
    fs::write(&f.config, config).unwrap();

    let (outs, _) = f.build(&derivation("throttled", "echo t > $out"));
    assert!(
        f.hook(Some(std::ffi::OsStr::new(&outs[0])), None)
            .status
            .success()
    );
    f.start_daemon();
    f.wait_published(&outs);

    // The HEADs alone: a request sent meanwhile (the read of nix-cache-info beside the bucket's
    // check) is not the throttled one's retry.
    let log = relay.matched();
    let last_throttled = log
        .iter()
        .rposition(|(_, f)| f.is_some())
        .expect("throttled");
    let (throttled_at, _) = log[last_throttled];
    let (next_at, _) = log[last_throttled + 1];
    // Without Retry-After the first retry would come after the base delay, 50 ms at most.
    assert!(
        next_at - throttled_at >= Duration::from_millis(2900),
        "retried {:?} after being throttled",
        next_at - throttled_at
    );
    let daemon_log = f.log();
    assert!(
        daemon_log.contains("S3 is throttling requests"),
        "{daemon_log}"
    );
}

/// The daemon's metrics, served over HTTP and written for the textfile collector, read back with a
/// Prometheus text parser: they say what the test did (three items published, their bytes, the
/// retries that a 503 SlowDown caused).
#[test]
fn the_metrics_say_what_the_daemon_did() {
    let mut f = Flow::with_hook("", false);
    let relay = f.throttled(1);
    let textfile = f.dir.path().join("nixpush.prom");
    f.serve_metrics();
    f.configure(&format!("metrics-textfile = \"{}\"\n", textfile.display()));
    let (outs, _) = f.build(&many(3, "metrics"));
    for p in &outs {
        assert!(f.hook(Some(std::ffi::OsStr::new(p)), None).status.success());
    }
    f.start_daemon();
    f.wait_published(&outs);
    wait_for("every item to be recorded done", || {
        f.queue_items().iter().all(|(_, s)| *s == State::Done)
    });
    // The file is written after outcomes: wait for the one that saw all three done.
    wait_for("the metrics file to count three items done", || {
        fs::read_to_string(&textfile).is_ok_and(|t| {
            sample(
                &parse_metrics(&t),
                "nixpush_queue_items",
                &[("state", "done")],
            ) == Some(3.0)
        })
    });
    for m in [
        f.scrape(),
        parse_metrics(&fs::read_to_string(&textfile).unwrap()),
    ] {
        assert_eq!(
            sample(&m, "nixpush_queue_items", &[("state", "done")]),
            Some(3.0)
        );
        assert_eq!(
            sample(&m, "nixpush_queue_items", &[("state", "failed")]),
            Some(0.0)
        );
        // Every NAR's FileSize, as the narinfos record them.
        let bytes: u64 = outs
            .iter()
            .map(|p| {
                let h = p.parse::<StorePath>().unwrap().hash_part().to_owned();
                let info: NarInfo = String::from_utf8(f.s3.get(&format!("{h}.narinfo")).unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                info.file_size.unwrap()
            })
            .sum();
        assert_eq!(
            sample(&m, "nixpush_uploaded_bytes_total", &[]),
            Some(bytes as f64)
        );
        assert_eq!(relay.injected().get(&Fault::SlowDown), Some(&3));
        // The hooks ran before the daemon: each wrote the queue itself.
        assert_eq!(
            sample(&m, "nixpush_hook_fallback_items", &[("via", "queue")]),
            Some(3.0)
        );
        // The three 503s were the first attempts at opening the bucket; each item's NAR and
        // narinfo went up with a 2xx.
        let requests = |op: &str, outcome: &str| {
            sample(
                &m,
                "nixpush_s3_requests_total",
                &[("operation", op), ("outcome", outcome)],
            )
        };
        assert_eq!(requests("HeadBucket", "5xx"), Some(3.0), "{m:?}");
        assert!(
            requests("PutObject", "2xx").is_some_and(|n| n >= 6.0),
            "{m:?}"
        );
        let throttled = sample(&m, "nixpush_retries_total", &[("class", "throttle")]);
        assert!(throttled.is_some_and(|n| n >= 1.0), "{throttled:?}");
        assert!(sample(&m, "nixpush_last_publish_timestamp_seconds", &[]).is_some_and(|t| t > 0.0));
        let lag = m
            .samples
            .iter()
            .find(|s| s.metric == "nixpush_publish_lag_seconds")
            .expect("the lag histogram");
        match &lag.value {
            prometheus_parse::Value::Histogram(buckets) => {
                assert_eq!(buckets.last().map(|b| b.count), Some(3.0), "{buckets:?}")
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Regression: when recording outcomes failed (a full disk, the queue locked by another
/// process), the items stayed `in_flight` until the daemon was restarted, while the log said they
/// "will be retried".
#[test]
fn outcomes_that_cannot_be_recorded_are_recorded_once_the_queue_frees() {
    let mut f = Flow::with_hook("", false);
    // Each request takes 3 s across the relay: the items stay in flight for long enough to lock
    // the queue under them.
    let relay = Relay::start(
        &f.s3.endpoint,
        RelayConfig {
            delay: Duration::from_millis(1500),
            ..RelayConfig::default()
        },
    );
    f.route_through(&relay, "");
    let (outs, _) = f.build(&derivation("unrecorded", "echo u > $out"));
    f.start_daemon();
    assert!(
        f.hook(Some(std::ffi::OsStr::new(&outs[0])), None)
            .status
            .success()
    );
    wait_for("the item to be claimed", || {
        f.queue_items() == vec![(outs[0].clone(), State::InFlight)]
    });
    // Another process holds the queue's write lock for longer than the daemon's busy timeout.
    let mut lock = rusqlite::Connection::open(f.state.join("queue.sqlite")).unwrap();
    let tx = lock
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let state: String = tx
        .query_row("SELECT state FROM items", [], |r| r.get(0))
        .unwrap();
    assert_eq!(state, "in_flight", "locked too late to test anything");
    wait_for("the daemon to fail recording", || {
        f.log().contains("cannot record results; trying again")
    });
    tx.rollback().unwrap();
    wait_for("the outcome to be recorded", || {
        f.queue_items() == vec![(outs[0].clone(), State::Done)]
    });
    assert!(f.published(&outs[0]));
    let daemon = f.daemon.as_mut().unwrap();
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
}

/// Every narinfo a reader can see has its NAR and its references' narinfos. Each is looked for
/// after the narinfo was read, since it must have been written before. Narinfos found complete are
/// not read again (nothing is ever deleted), so a bucket of thousands is watched at a steady cost.
fn check_bucket(
    bucket: &BucketClient,
    complete: &mut BTreeSet<String>,
    violations: &mut BTreeSet<String>,
) {
    let unchecked: Vec<String> = bucket
        .keys()
        .into_iter()
        .filter(|k| k.ends_with(".narinfo") && !complete.contains(k))
        .collect();
    for name in unchecked {
        // An object a server is still writing may not parse yet; it is judged once it does.
        let Some(Ok(info)) = bucket
            .get(&name)
            .map(|b| String::from_utf8_lossy(&b).parse::<NarInfo>())
        else {
            continue;
        };
        let before = violations.len();
        if !bucket.exists(&info.url) {
            violations.insert(format!("{name}: NAR {} missing", info.url));
        }
        for r in info.references.iter().filter(|r| **r != info.store_path) {
            if !bucket.exists(&format!("{}.narinfo", r.hash_part())) {
                violations.insert(format!("{name}: reference {r} missing"));
            }
        }
        if violations.len() == before {
            complete.insert(name);
        }
    }
}

/// A reader polling the bucket from another thread until stopped; returns what it saw wrong.
struct Watcher {
    stop: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<BTreeSet<String>>,
}

impl Watcher {
    fn start(bucket: &BucketClient) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (bucket, stop) = (bucket.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut complete, mut violations) = (BTreeSet::new(), BTreeSet::new());
                while !stop.load(Ordering::Relaxed) {
                    check_bucket(&bucket, &mut complete, &mut violations);
                    // A pace, not a wait: the CPU stays with the upload on a small machine.
                    std::thread::sleep(Duration::from_millis(20));
                }
                check_bucket(&bucket, &mut complete, &mut violations);
                violations
            })
        };
        Watcher { stop, reader }
    }

    fn violations(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.reader.join().unwrap()
    }
}

on_every_server!(
    sigkill_during_a_large_upload_loses_nothing_and_never_publishes_early,
    sigkill_during_a_large_upload
);
fn sigkill_during_a_large_upload(kind: S3Kind) {
    let mut f = Flow::on(
        kind,
        "compression=none&multipart-upload=true&multipart-threshold=5242880&multipart-chunk-size=5242880",
        true,
    );
    f.start_daemon();
    let expr = with_dependency(
        "kill-big",
        "mkdir $out && head -c 157286400 /dev/urandom > $out/blob",
        "kill-top",
    );
    let watcher = Watcher::start(&f.s3);
    let (outs, _) = f.build(&expr);
    let journal = f.state.join("multipart");
    wait_for("a multipart upload to be in progress", || {
        fs::read_dir(&journal).is_ok_and(|mut d| d.next().is_some())
    });
    assert!(!f.signal_daemon(libc::SIGKILL).success());
    assert!(
        outs.iter().all(|p| !f.published(p)),
        "published before the kill"
    );
    f.start_daemon();
    f.wait_published(&f.nix.requisites(&outs));
    let violations = watcher.violations();
    assert!(
        violations.is_empty(),
        "a reader saw incomplete entries: {violations:?}"
    );
    assert!(
        f.log()
            .contains("aborted multipart uploads left by an earlier run"),
        "{}",
        f.log()
    );
    assert_eq!(
        fs::read_dir(&journal).unwrap().count(),
        0,
        "journal not cleared"
    );
    // s3s-fs does not list multipart uploads; the others show that the abort reached the server.
    if kind != S3Kind::S3sFs {
        assert_eq!(f.s3.multipart_uploads(), Vec::<String>::new());
    }
}

/// How long the chaos test's relay misbehaves.
const CHAOS: Duration = Duration::from_secs(60);
/// The 40 MB path goes up in 5 MiB parts.
const CHAOS_PARAMS: &str =
    "multipart-upload=true&multipart-threshold=8388608&multipart-chunk-size=5242880";
/// How soon after the faults stop (or the builds end, if later) everything must be published.
const CHAOS_SETTLE: Duration = Duration::from_secs(240);

/// The hardening issue's chaos test: for 60 s, one request in 50 gets a random fault (reset,
/// stall, cut, 500, 503 SlowDown, trickle) while 1,000 small paths and a 40 MB multipart one are
/// built through the hook. The relay makes each request a connection of its own, since it decides
/// faults per connection and the daemon keeps its connections alive. Every build succeeds; everything is published within
/// 4 minutes after the faults stop; a reader polling the bucket never sees a narinfo before its NAR
/// and references; nothing ends `failed`; Nix 2.8 verifies and substitutes it all.
fn chaos(kind: S3Kind) {
    let mut f = Flow::on(kind, CHAOS_PARAMS, true);
    let relay = Relay::start(
        &f.s3.endpoint,
        RelayConfig {
            faults: Faults {
                seed: 0x5eed,
                probability: 0.02,
                kinds: Fault::ALL.to_vec(),
                window: Duration::ZERO..CHAOS,
                ..Faults::none()
            },
            one_request_per_connection: true,
            ..RelayConfig::default()
        },
    );
    let faults_end = Instant::now() + CHAOS;
    f.route_through(&relay, CHAOS_PARAMS);
    f.start_daemon();
    let watcher = Watcher::start(&f.s3);
    let (mut outs, _) = f.build(&many(1000, "chaos"));
    let (large, _) = f.build(&derivation(
        "chaos-large",
        "head -c 41943040 /dev/urandom > $out",
    ));
    outs.extend(large);
    assert_eq!(outs.len(), 1001);
    let built = Instant::now();
    let deadline = faults_end.max(built) + CHAOS_SETTLE;
    while !outs.iter().all(|p| f.published(p)) {
        if Instant::now() > deadline {
            let status = f.nixpush().args(["status"]).output().unwrap();
            panic!(
                "{} of {} not published {:?} after the faults stopped\nstatus: {}\ninjected: {:?}",
                outs.iter().filter(|p| !f.published(p)).count(),
                outs.len(),
                CHAOS_SETTLE,
                String::from_utf8_lossy(&status.stdout),
                relay.injected()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "chaos on {kind:?}: builds took {:?}, everything was published {:?} after the faults stopped; injected {:?}",
        built.duration_since(faults_end - CHAOS),
        Instant::now().saturating_duration_since(faults_end),
        relay.injected()
    );
    wait_for("every item to be recorded done", || {
        f.queue_items().iter().all(|(_, s)| *s == State::Done)
    });
    let injected = relay.injected();
    for fault in Fault::ALL {
        assert!(
            injected.get(&fault).is_some_and(|n| *n > 0),
            "{fault:?} never happened: {injected:?}"
        );
    }
    let violations = watcher.violations();
    assert!(
        violations.is_empty(),
        "a reader saw incomplete entries: {violations:?}"
    );
    let mut verify = f.nix.cmd("nix");
    verify
        .args([
            "store",
            "verify",
            "--store",
            &f.s3.http_url,
            "-r",
            "--sigs-needed",
            "1",
        ])
        .args(["--option", "trusted-public-keys", &f.public])
        .args(&outs);
    nixpush_testbed::check("nix store verify", verify.output().unwrap());
    let closure = f.nix.requisites(&outs);
    f.substitute_back(&outs, &closure);
}

#[test]
fn chaos_on_s3s_fs() {
    chaos(S3Kind::S3sFs)
}

#[test]
fn chaos_on_garage() {
    chaos(S3Kind::Garage)
}

#[test]
fn unset_out_paths_are_resolved_from_drv_path() {
    let mut f = Flow::with_hook("", false);
    let (outs, _) = f.build(&derivation("unset-outs", "echo u > $out"));
    let drv = f.nix.run("nix-store", &["--query", "--deriver", &outs[0]]);
    let o = f.hook(None, Some(drv.trim()));
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("queued the outputs of"),
        "{o:?}"
    );
    assert_eq!(
        f.queue_items(),
        vec![(drv.trim().to_owned(), State::Queued)]
    );
    f.start_daemon();
    f.wait_published(&outs);
}

#[test]
fn a_derivation_whose_outputs_were_never_built_ends_as_gone() {
    let mut f = Flow::with_hook("", false);
    // Instantiated, not built: a hook can name such a .drv when its build failed.
    let drv = f.nix.run(
        "nix-instantiate",
        &["-E", &derivation("never-built", "echo n > $out")],
    );
    let drv = drv.trim().to_owned();
    assert!(f.hook(None, Some(&drv)).status.success());
    f.start_daemon();
    wait_for("the item to be settled", || {
        f.queue_items() == vec![(drv.clone(), State::Gone)]
    });
    assert!(f.log().contains("gone from the store"), "{}", f.log());
    assert!(
        !f.s3.keys().iter().any(|k| k.ends_with(".narinfo")),
        "{:?}",
        f.s3.keys()
    );
}

/// Two outputs, one depending on another derivation, as one expression.
fn two_outputs(tag: &str) -> String {
    format!(
        "(let dep = {}; in derivation {{ name = \"{tag}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; outputs = [ \"out\" \"dev\" ]; \
         args = [ \"-c\" \"echo ${{dep}} > $out; echo dev > $dev\" ]; }}).all",
        derivation(&format!("{tag}-dep"), "echo dep > $out")
    )
}

/// Regression: builds recorded while the daemon was down were garbage-collected before it started,
/// and all ended `gone`: nothing was published, where the blocking recipe would have uploaded them.
#[test]
fn queued_paths_survive_garbage_collection_until_published() {
    let mut f = Flow::new("");
    let (outs, log) = f.build(&two_outputs("collected"));
    assert_eq!(outs.len(), 2);
    assert!(log.contains("wrote the queue directly"), "{log}");
    let closure = f.nix.requisites(&outs);
    let drv = f.nix.run("nix-store", &["--query", "--deriver", &outs[0]]);
    let drv = drv.trim().to_owned();
    // Nothing queued is garbage: not the outputs, their dependency, or the derivation (once the
    // build's own temporary roots are gone).
    f.nix.wait_idle();
    let dead = f.dead();
    for p in closure.iter().chain([&drv]) {
        assert!(!dead.contains(p), "{p} would be collected");
    }
    let refused = f
        .nix
        .cmd("nix-store")
        .args(["--delete", &outs[0]])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "nix-store --delete removed a queued path"
    );
    f.start_daemon();
    f.wait_published(&closure);
    wait_for("the items to be recorded done", || {
        f.queue_items().iter().all(|(_, s)| *s == State::Done)
    });
    // Published: the roots are gone, and the collector may have the paths again.
    wait_for("the roots to be released", || {
        fs::read_dir(f.roots.path()).unwrap().count() == 0
    });
    let dead = f.dead();
    assert!(
        outs.iter().all(|p| dead.contains(p)),
        "still alive: {outs:?}"
    );
    let closure_of_outs = f.nix.requisites(&outs);
    f.substitute_back(&outs, &closure_of_outs);
}

/// Regression: on Nix 2.8 every hook item is a derivation, and one collected before the upload was
/// retried for 24 hours and then `failed` (the daemon's answer for it is an error, not "invalid").
#[test]
fn a_derivation_collected_before_the_upload_ends_as_gone() {
    let mut f = Flow::new("");
    f.without_gc_roots();
    let (outs, _) = f.build(&derivation("drv-collected", "echo d > $out"));
    let drv = f.nix.run("nix-store", &["--query", "--deriver", &outs[0]]);
    let drv = drv.trim().to_owned();
    // What a collection does to an unrooted build: the output goes, then (kept while its output
    // lived, by keep-derivations) the derivation.
    f.nix.wait_idle();
    f.nix.delete(&outs[0]);
    f.nix.delete(&drv);
    f.start_daemon();
    wait_for("the item to be settled", || {
        f.queue_items() == vec![(drv.clone(), State::Gone)]
    });
    let status = f.nixpush().args(["status"]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("garbage-collected"), "{status}");
}

/// Regression: a derivation with one of its outputs collected had none of them uploaded.
#[test]
fn the_outputs_left_of_a_derivation_are_published() {
    let mut f = Flow::new("");
    f.without_gc_roots();
    let (outs, _) = f.build(&two_outputs("half-collected"));
    let dev = outs.iter().find(|p| p.ends_with("-dev")).unwrap().clone();
    let out = outs.iter().find(|p| !p.ends_with("-dev")).unwrap().clone();
    f.nix.wait_idle();
    f.nix.delete(&dev);
    f.start_daemon();
    f.wait_published(std::slice::from_ref(&out));
    wait_for("the item to be recorded done", || {
        f.queue_items().iter().all(|(_, s)| *s == State::Done)
    });
    assert!(!f.published(&dev));
    assert!(
        f.log().contains("outputs gone from the store"),
        "{}",
        f.log()
    );
}

/// A tmpfs mounted for a test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        nixpush_testbed::check(
            "mount (the full-disk test needs root)",
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(at)
                .output()
                .unwrap(),
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with one file; returns it.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.sync_all();
    filler
}

/// Regression: with the state directory's filesystem full, the hook recorded nothing (one log line)
/// and the build was never uploaded.
#[test]
fn builds_on_a_full_disk_are_spilled_and_published_once_space_returns() {
    let mut f = Flow::new("");
    let _tmpfs = Tmpfs::mount(&f.state, "2m");
    f.start_daemon();
    let filler = fill(&f.state);
    let (outs, log) = f.build(&many(3, "full-disk"));
    assert_eq!(
        log.matches("WARNING: recorded").count(),
        3,
        "every hook spilled: {log}"
    );
    assert!(log.contains("queue not writable"), "{log}");
    let status = f.nixpush().args(["status"]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("3 hook records in"), "{status}");
    assert!(outs.iter().all(|p| !f.published(p)));
    fs::remove_file(filler).unwrap();
    f.wait_published(&outs);
    assert!(
        fs::read_dir(f.dir.path().join("spill")).unwrap().count() == 0,
        "spill files left behind"
    );
    assert!(
        f.log().contains("queued items the hook had to spill"),
        "{}",
        f.log()
    );
}

/// Regression: errors lost their cause: a full spool showed as "cannot write the NAR spool file
/// in …" without "No space left on device", in the log and in `nixpush status`.
#[test]
fn a_full_spool_is_reported_with_its_cause() {
    let mut f = Flow::new("compression=none");
    let _tmpfs = Tmpfs::mount(&f.state.join("spool"), "1m");
    f.start_daemon();
    // 3 MiB that do not compress: more than the spool can hold.
    let (outs, _) = f.build(&derivation(
        "spool-full",
        "head -c 3145728 /dev/urandom > $out",
    ));
    f.wait_for_error("the failure to be recorded", |_, error| {
        error.contains("spool")
    });
    let status = f.nixpush().args(["status"]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("cannot write the NAR spool file")
            && status.contains("No space left on device"),
        "{status}"
    );
    assert!(!f.published(&outs[0]));
}

/// Regression: a configuration that failed to parse made the hook record into the default state
/// directory, which no daemon reads, and say only "config ignored".
#[test]
fn a_broken_config_still_records_where_the_daemon_looks() {
    let mut f = Flow::new("");
    f.start_daemon();
    // Edited while the daemon runs: the daemon keeps the configuration it started with.
    let mut text = fs::read_to_string(&f.config).unwrap();
    text.push_str("jobs = \"many\"\n[[[\n");
    fs::write(&f.config, text).unwrap();
    let (outs, log) = f.build(&derivation("broken-config", "echo b > $out"));
    assert!(
        log.contains("ERROR:") && log.contains("recorded with the locations read from it"),
        "{log}"
    );
    assert!(log.contains(&f.state.display().to_string()), "{log}");
    f.wait_published(&outs);
}

#[test]
fn bad_input_to_the_hook_never_fails_and_keeps_the_valid_paths() {
    use std::os::unix::ffi::OsStringExt;
    let f = Flow::with_hook("", false);
    // Linux limits one environment string to 128 KiB (MAX_ARG_STRLEN), about 2,800 store paths, so
    // 10,000 paths arrive as four hook runs of 2,500 (the parser alone takes 10,000 in a unit test).
    let mut took = Vec::new();
    for batch in 0..4 {
        let valid: Vec<String> = (0..2500)
            .map(|i| format!("/nix/store/{:0>32}-b{batch}-{i}", i % 10))
            .collect();
        let mut out =
            b"garbage /tmp/outside /nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-odd?name=ok \
                        /nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-star* name with spaces "
                .to_vec();
        out.extend_from_slice(b"/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-\xff\xfe ");
        out.extend_from_slice(valid.join(" ").as_bytes());
        let start = Instant::now();
        let o = f.hook(Some(&std::ffi::OsString::from_vec(out)), Some("not a drv"));
        took.push(start.elapsed());
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success());
        assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
        assert!(
            stdout.contains("queued 2501 paths") && stdout.contains("ignored 7 invalid"),
            "{stdout}"
        );
        assert!(
            stdout.contains("\"garbage\" (") && stdout.contains("and 4 more"),
            "{stdout}"
        );
    }
    let items = f.queue_items();
    assert_eq!(
        items.len(),
        10_001,
        "10,000 distinct paths and the one with `?` and `=`"
    );
    assert!(items.iter().any(|(p, _)| p.ends_with("-odd?name=ok")));
    eprintln!("4 hook runs of 2,501 paths took {took:?}");

    // Garbage only, and nothing at all: exit 0, say so, record nothing.
    for (out, drv) in [(Some("complete garbage"), None), (None, None)] {
        let o = f.hook(out.map(std::ffi::OsStr::new), drv);
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to queue"));
    }
    assert_eq!(f.queue_items().len(), 10_001);
}

#[test]
fn a_hook_that_cannot_record_anything_still_exits_zero_and_says_why() {
    let f = Flow::with_hook("", false);
    // The state directory's and the spill directory's places are files: nothing can be created.
    fs::write(&f.state, "not a directory").unwrap();
    fs::write(f.dir.path().join("spill"), "not a directory").unwrap();
    let o = f.hook(
        Some(std::ffi::OsStr::new(
            "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-x",
        )),
        None,
    );
    assert!(o.status.success());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("ERROR: could not record")
            && stdout.contains(&f.state.display().to_string()),
        "{stdout}"
    );
}

/// Regression: the hook printed its line with `println!`, outside its `catch_unwind`; with its
/// stdout a pipe nobody reads any more, that panicked (EPIPE), the hook exited 101, and Nix stopped
/// its build loop.
#[test]
fn a_hook_whose_stdout_is_gone_still_exits_zero_and_records() {
    let f = Flow::with_hook("", false);
    let path = "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-stdout-gone";
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(hook_bin())
        .env("NIXPUSH_CONFIG", &f.config)
        .env("OUT_PATHS", path)
        .env_remove("DRV_PATH")
        .stdout(writer)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(f.queue_items(), vec![(path.to_owned(), State::Queued)]);
}

/// Regression: the hook connected to the daemon's socket without a timeout; a daemon that stopped
/// accepting (stopped, or swamped until its backlog filled) blocked the hook, and so Nix's build
/// loop, for as long as the daemon lived.
#[test]
fn a_hook_facing_a_socket_that_accepts_nothing_records_directly() {
    let f = Flow::with_hook("", false);
    let _listener = std::os::unix::net::UnixListener::bind(&f.socket).unwrap();
    // Fill the listener's backlog: from here on a connect would wait for an accept.
    let mut held = Vec::new();
    while let Ok(s) = nixpush_store::unix::connect(
        &f.socket,
        Duration::from_millis(100),
        Duration::from_secs(1),
    ) {
        held.push(s);
        assert!(held.len() < 10_000, "the backlog never filled");
    }
    let path = "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-unaccepted";
    let mut hook = Command::new(hook_bin())
        .env("NIXPUSH_CONFIG", &f.config)
        .env("OUT_PATHS", path)
        .env_remove("DRV_PATH")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the hook to exit", || hook.try_wait().unwrap().is_some());
    let o = hook.wait_with_output().unwrap();
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("wrote the queue directly"),
        "{o:?}"
    );
    assert_eq!(f.queue_items(), vec![(path.to_owned(), State::Queued)]);
}

/// `chown -R USER` of each path.
fn give(user: &str, paths: &[&Path]) {
    for p in paths {
        nixpush_testbed::check(
            "chown",
            Command::new("chown")
                .args(["-R", user])
                .arg(p)
                .output()
                .unwrap(),
        );
    }
}

/// Regression: the daemon could not run as its own user while the hook (root) created the queue,
/// and nothing checked who talked to its socket. Here the daemon runs as `nobody`; the hook, as
/// root, records builds both with the daemon down (it creates the queue) and up; everything is
/// published; a request from another user is refused even through a socket opened to everyone.
#[test]
fn the_daemon_runs_as_its_own_user_with_the_hook_as_root() {
    use std::os::unix::fs::PermissionsExt;
    let mut f = Flow::new("");
    let open = |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    open(f.dir.path());
    open(f.nix.dir.path());
    // The daemon's own directories, as `install.sh --user` makes them.
    let run = f.dir.path().join("run");
    let (state, spill) = (f.state.clone(), f.dir.path().join("spill"));
    for d in [&run, &state, &spill] {
        fs::create_dir_all(d).unwrap();
    }
    give(
        "nobody:nogroup",
        &[
            &run,
            &state,
            &spill,
            f.roots.path(),
            &f.dir.path().join("sk"),
        ],
    );
    let socket = run.join("hook.sock");
    let config = fs::read_to_string(&f.config).unwrap().replace(
        &f.socket.display().to_string(),
        &socket.display().to_string(),
    );
    fs::write(&f.config, config).unwrap();
    f.socket = socket;
    // The binary where nobody can run it, wherever the checkout is.
    let bin = f.dir.path().join("nixpush");
    fs::copy(env!("CARGO_BIN_EXE_nixpush"), &bin).unwrap();

    // Daemon down: the hook (root) creates the queue.
    let (first, _) = f.build(&many(2, "own-user-down"));
    let log = fs::File::create(&f.daemon_log).unwrap();
    let daemon = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(&bin)
        .args(["daemon", "--store", &f.nix.store_url()])
        .env("NIXPUSH_CONFIG", &f.config)
        .envs(f.s3.credentials_env())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    f.daemon = Some(daemon);
    let socket = f.socket.clone();
    wait_for("the daemon's socket", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    f.wait_published(&first);
    // Daemon up: through the socket.
    let (second, log) = f.build(&many(2, "own-user-up"));
    assert_eq!(log.matches("(daemon)").count(), 2, "{log}");
    f.wait_published(&second);

    // The daemon's user plants a symlink where the hook (root) will make an item's roots, to make
    // root write into a directory of root's. The hook works there as that user: it cannot.
    let expr = derivation("own-user-planted", "echo p > $out");
    let drv = f.nix.run("nix-instantiate", &["-E", &expr]);
    let drv: nixpush_format::StorePath = drv.trim().parse().unwrap();
    let victim = f.dir.path().join("root-only");
    fs::create_dir(&victim).unwrap();
    std::os::unix::fs::symlink(&victim, f.roots.path().join(drv.base_name())).unwrap();
    let (planted, log) = f.build(&expr);
    assert!(
        log.contains("not protected from garbage collection"),
        "{log}"
    );
    assert_eq!(
        fs::read_dir(&victim).unwrap().count(),
        0,
        "root wrote through the symlink"
    );
    f.wait_published(&planted);
    wait_for("every item to be recorded done", || {
        f.queue_items().iter().all(|(_, s)| *s == State::Done)
    });
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(f.state.join("queue.sqlite")).unwrap().uid();
    assert_eq!(owner, 65534, "the queue belongs to the daemon's user");

    // Someone else, through a socket opened to everyone: refused by its credentials.
    fs::set_permissions(&f.socket, fs::Permissions::from_mode(0o666)).unwrap();
    let hook = f.dir.path().join("nixpush-hook");
    fs::copy(hook_bin(), &hook).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=daemon", "--regid=daemon", "--clear-groups"])
        .arg(&hook)
        .env("NIXPUSH_CONFIG", &f.config)
        .env(
            "OUT_PATHS",
            "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-intruder",
        )
        .env_remove("DRV_PATH")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(out.contains("daemon refused: refused: uid 1"), "{out}");
    assert!(
        !f.queue_items()
            .iter()
            .any(|(p, _)| p.ends_with("-intruder"))
    );
    assert!(
        f.log().contains("refused a request on the hook socket"),
        "{}",
        f.log()
    );
}

fn sixty_four_hooks(f: &Flow) {
    let children: Vec<(String, Child)> = (0..64)
        .map(|i| {
            let p = format!("/nix/store/{:0>32}-hook-{i}", i % 10);
            let c = Command::new(hook_bin())
                .env("NIXPUSH_CONFIG", &f.config)
                .env("OUT_PATHS", &p)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            (p, c)
        })
        .collect();
    for (p, c) in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{p}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("queued"),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn sixty_four_hooks_at_once_lose_nothing() {
    let mut f = Flow::with_hook("", false);
    // Daemon down: 64 processes write the queue database at once.
    sixty_four_hooks(&f);
    let names: BTreeSet<String> = f.queue_items().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 64);
    // Daemon up: 64 at once through the socket. The paths do not exist, so they end as gone.
    f.start_daemon();
    let q = f.state.clone();
    wait_for("the first 64 to be settled", || {
        Queue::open(&q)
            .unwrap()
            .items()
            .unwrap()
            .iter()
            .all(|(_, s)| *s == State::Gone)
    });
    sixty_four_hooks(&f);
    wait_for("all 128 to be settled", || {
        let items = Queue::open(&q).unwrap().items().unwrap();
        items.len() == 128 && items.iter().all(|(_, s)| *s == State::Gone)
    });
    assert!(f.log().contains("gone from the store"));
}

#[test]
fn a_corrupt_path_fails_with_its_reason_and_can_be_retried() {
    let mut f = Flow::new("");
    f.start_daemon();
    let (outs, _) = f.build(&derivation(
        "flow-corrupt",
        "mkdir $out && echo ok > $out/f",
    ));
    f.wait_published(&outs);
    // Corrupt it, then ask for it again: this time it must fail permanently, not retry forever.
    fs::write(Path::new(&outs[0]).join("f"), "bad\n").unwrap();
    let h = outs[0].parse::<StorePath>().unwrap().hash_part().to_owned();
    fs::remove_file(f.s3.object(&format!("{h}.narinfo"))).unwrap();
    let o = f.hook(Some(std::ffi::OsStr::new(&outs[0])), None);
    assert!(String::from_utf8_lossy(&o.stdout).contains("(daemon)"));
    let q = f.state.clone();
    wait_for("the item to fail", || {
        Queue::open(&q)
            .unwrap()
            .items()
            .unwrap()
            .iter()
            .any(|(_, s)| *s == State::Failed)
    });
    let status = f.nixpush().args(["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("failed 1")
            && text.contains("refusing to upload")
            && text.contains("corrupt"),
        "{text}"
    );
    assert!(!f.published(&outs[0]));
    let json = f.nixpush().args(["status", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["counts"]["failed"], 1);
    // For monitoring: --check fails, naming why; --failed lists the item with its reason.
    let check = f.nixpush().args(["status", "--check"]).output().unwrap();
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    assert!(String::from_utf8_lossy(&check.stderr).contains("1 items failed"));
    let listed = f.nixpush().args(["status", "--failed"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&format!(
            "{} (after 1 attempts): refusing to upload",
            outs[0]
        )),
        "{listed}"
    );

    // Repaired (here: the original contents back), `retry PATH` publishes it; naming another path
    // requeues nothing.
    fs::write(Path::new(&outs[0]).join("f"), "ok\n").unwrap();
    let other = "/nix/store/00000000000000000000000000000000-other";
    let o = f.nixpush().args(["retry", other]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 failed items queued again"));
    let o = f.nixpush().args(["retry", &outs[0]]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 failed items queued again"));
    f.wait_published(&outs);
    wait_for("the item to be recorded done", || {
        f.queue_items().iter().all(|(_, s)| *s == State::Done)
    });
    let check = f
        .nixpush()
        .args(["status", "--check", "--max-age", "10m"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

#[test]
fn one_daemon_per_state_directory_and_bad_config_is_named() {
    let mut f = Flow::with_hook("", false);
    f.start_daemon();
    let o = f
        .nixpush()
        .args(["daemon", "--socket"])
        .arg(f.dir.path().join("other.sock"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("another nixpush daemon is running"),
        "{o:?}"
    );

    let bad = f.dir.path().join("bad.toml");
    fs::write(&bad, "to = \"s3://x\"\njobz = 3\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .arg("daemon")
        .env("NIXPUSH_CONFIG", &bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("jobz") && err.contains("bad.toml"), "{err}");
    // The socket is not open to other users.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&f.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn socket_group_opens_the_socket_to_that_group_only() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut f = Flow::with_hook("", false);
    f.configure("socket-group = \"nixbld\"\n");
    f.start_daemon();
    let meta = fs::metadata(&f.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let out = Command::new("getent")
        .args(["group", "nixbld"])
        .output()
        .unwrap();
    let gid: u32 = String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(meta.gid(), gid);
    // A group that does not exist is refused by name.
    let bad = f.dir.path().join("bad-group.toml");
    let text = fs::read_to_string(&f.config)
        .unwrap()
        .replace("nixbld", "no-such-group-here");
    fs::write(
        &bad,
        text.replace(
            &f.state.display().to_string(),
            &f.dir.path().join("s2").display().to_string(),
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .args(["daemon", "--socket"])
        .arg(f.dir.path().join("other.sock"))
        .env("NIXPUSH_CONFIG", &bad)
        .envs(f.s3.credentials_env())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("socket-group `no-such-group-here` does not exist"),
        "{o:?}"
    );
}
