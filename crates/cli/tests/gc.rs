//! Retention: `nixpush gc` and pins on caches Nix 2.8 substitutes from, against a real nix-daemon,
//! s3s-fs and directories.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use nixpush_testbed::{Fault, Faults, Relay, RelayConfig, RequestMatch, derivation};

#[macro_use]
mod common;
use common::{Bed, assert_refused, text};

fn hash_part(p: &str) -> String {
    p.trim_start_matches("/nix/store/")[..32].to_owned()
}

/// A cache as the test sees it: its URL, and the directory its objects are files in (s3s-fs keeps
/// them as plain files too), where the test ages them.
struct Cache {
    url: String,
    dir: PathBuf,
}

impl Cache {
    fn nixpush(&self, bed: &Bed, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args(args)
            .args(["--store", &self.url])
            .envs(bed.s3.credentials_env())
            .output()
            .unwrap()
    }

    fn keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![self.dir.clone()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.push(p.strip_prefix(&self.dir).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    /// The keys substituters read: all but nixpush's own bookkeeping under `nixpush/`.
    fn cache_keys(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| !k.starts_with("nixpush/"))
            .collect()
    }

    fn has_narinfo(&self, path: &str) -> bool {
        self.dir
            .join(format!("{}.narinfo", hash_part(path)))
            .exists()
    }

    /// Makes every object written so far two days old, as if pushed then.
    fn age_everything(&self) {
        let then = SystemTime::now() - Duration::from_secs(2 * 86400);
        for key in self.keys() {
            let f = fs::File::options()
                .write(true)
                .open(self.dir.join(&key))
                .unwrap();
            f.set_modified(then).unwrap();
        }
    }
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

/// An old closure (`old -> shared`) and an old twin (same contents as a pinned path, so they share
/// one NAR), then new pushes: `new -> shared` and the pinned twin. A collection keeps the new, the
/// pinned and the shared, deletes the old narinfos and the NAR only the old one needed, leaves the
/// shared NAR, and Nix 2.8 verifies and substitutes what is left.
fn collects_what_no_root_needs(bed: &Bed, cache: &Cache) {
    let uses_dep = |name: &str| {
        derivation(name, &format!("echo {name} ${{dep}} > $out")).replace("\\${dep}", "${dep}")
    };
    let both = bed.nix.build(&format!(
        "let dep = {}; in [ ({}) ({}) ]",
        derivation("gc-shared", "echo shared > $out"),
        uses_dep("gc-old"),
        uses_dep("gc-new")
    ));
    let (old, new) = (both[0].clone(), both[1].clone());
    let shared = bed
        .nix
        .requisites(std::slice::from_ref(&old))
        .into_iter()
        .find(|p| p.ends_with("gc-shared"))
        .expect("the dependency");
    let twin = |name: &str| {
        bed.nix
            .build(&derivation(name, "echo the-same-bytes > $out"))[0]
            .clone()
    };
    let dead_twin = twin("gc-dead-twin");
    bed.push_ok(&cache.url, &[&old, &dead_twin]);
    cache.age_everything();
    let pinned = bed
        .nix
        .build(&derivation("gc-pinned", "echo pinned > $out"))[0]
        .clone();
    let live_twin = twin("gc-live-twin");
    bed.push_ok(&cache.url, &[&new]);
    // Pushed long ago too, but pinned.
    bed.push_ok(&cache.url, &[&pinned, &live_twin]);
    for p in [&pinned, &live_twin] {
        let f = cache.dir.join(format!("{}.narinfo", hash_part(p)));
        fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(2 * 86400))
            .unwrap();
    }
    let o = cache.nixpush(bed, &["pin", "keep", &pinned, &live_twin]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cache.nixpush(bed, &["pins", "--json"]);
    assert!(
        json(&o)[0]["paths"].as_array().unwrap().len() == 2,
        "{}",
        text(&o)
    );

    let before = cache.keys();
    let memo = bed.dir.path().join("gc-memo.json");
    let gc = |extra: &[&str]| {
        let mut args = vec!["gc", "--keep-within", "1d", "--nar-grace", "0s", "--json"];
        args.extend(["--memo", memo.to_str().unwrap()]);
        args.extend(extra);
        cache.nixpush(bed, &args)
    };
    let o = gc(&["--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let plan = json(&o);
    assert_eq!(plan["dead"], 2, "the old root and the dead twin: {plan}");
    assert_eq!(plan["nar_garbage"], 1, "only the old root's NAR: {plan}");
    assert_eq!(plan["narinfos_read"], 6, "{plan}");
    assert_eq!(cache.keys(), before, "a dry run changes nothing");

    let o = gc(&["--max-delete", "1"]);
    assert_refused(&o, "max-delete");
    assert!(cache.has_narinfo(&old), "a refused plan deletes nothing");

    let prom = bed.dir.path().join("gc.prom");
    let o = gc(&["--metrics-textfile", prom.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let report = json(&o);
    let lines: Vec<std::io::Result<String>> = fs::read_to_string(&prom)
        .unwrap()
        .lines()
        .map(|l| Ok(l.to_owned()))
        .collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).unwrap();
    let value = |name: &str, kind: Option<&str>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && kind.is_none_or(|k| s.labels.get("kind") == Some(k)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("nixpush_gc_deleted", Some("narinfo")), Some(2.0));
    assert_eq!(value("nixpush_gc_last_run_success", None), Some(1.0));
    if !cache.url.starts_with("file://") {
        // A request per batch of keys, not per key (the probe of conditional writes is one).
        assert!(
            report["requests"]["DeleteObjects"].as_u64() >= Some(1),
            "{report}"
        );
        assert_eq!(report["requests"]["DeleteObject"], 1, "{report}");
    }
    // s3s-fs does not implement GetBucketVersioning: the report says so rather than guess.
    let versioning = report["versioning"].as_str().unwrap();
    if cache.url.starts_with("file://") {
        assert_eq!(versioning, "not a bucket");
    } else {
        assert!(
            versioning == "off" || versioning.starts_with("unknown ("),
            "{versioning}"
        );
    }
    assert_eq!(report["deleted_narinfos"], 2, "{report}");
    assert_eq!(report["deleted_nars"], 1, "{report}");
    assert_eq!(
        report["narinfos_read"], 0,
        "remembered from the earlier runs, unchanged: {report}"
    );
    // Both marks keep the sessions; the second reads none again, since none changed.
    assert!(report["sessions_kept"].as_u64() >= Some(2), "{report}");
    assert_eq!(report["sessions_read"], report["sessions_kept"], "{report}");
    assert!(!cache.has_narinfo(&old) && !cache.has_narinfo(&dead_twin));
    for p in [&new, &shared, &pinned, &live_twin] {
        assert!(cache.has_narinfo(p), "{p} deleted");
    }
    assert!(
        cache
            .keys()
            .iter()
            .any(|k| k.starts_with("nixpush/gc/reports/")),
        "a report is written"
    );
    // What is left is whole: verified, and substituted by Nix.
    let roots = [new.clone(), pinned.clone(), live_twin.clone()];
    let o = bed.verify(&cache.url, &[&roots[0], &roots[1], &roots[2]]);
    assert!(o.status.success(), "{}", text(&o));
    let closure = bed.nix.requisites(&roots);
    // The old root still refers to the shared path locally.
    bed.nix.delete(&old);
    let (ok, err) = bed.substitute(&substituter(bed, cache), &roots, &closure);
    assert!(ok, "substitution failed: {err}");
}

fn substituter(bed: &Bed, cache: &Cache) -> String {
    if cache.url.starts_with("file://") {
        cache.url.clone()
    } else {
        bed.s3.http_url.clone()
    }
}

#[test]
fn a_directory_cache_is_collected_and_stays_whole() {
    let bed = Bed::new();
    let dir = bed.dir.path().join("cache");
    let cache = Cache {
        url: format!("file://{}", dir.display()),
        dir,
    };
    collects_what_no_root_needs(&bed, &cache);
}

#[test]
fn an_s3_cache_is_collected_and_stays_whole() {
    let bed = Bed::new();
    let cache = Cache {
        url: bed.s3.store_url(""),
        dir: bed.s3.bucket_dir(),
    };
    collects_what_no_root_needs(&bed, &cache);
}

/// A narinfo that cannot be read (here: a link out of the cache directory, refused) is not "gone":
/// the run stops while marking, and nothing is deleted.
#[test]
fn an_unreadable_narinfo_stops_the_run_with_nothing_deleted() {
    let bed = Bed::new();
    let dir = bed.dir.path().join("cache");
    let cache = Cache {
        url: format!("file://{}", dir.display()),
        dir: dir.clone(),
    };
    let old = bed.nix.build(&derivation("gc-unreadable", "echo x > $out"))[0].clone();
    bed.push_ok(&cache.url, &[&old]);
    cache.age_everything();
    std::os::unix::fs::symlink(
        Path::new("/etc/hostname"),
        dir.join("00000000000000000000000000000000.narinfo"),
    )
    .unwrap();
    let before = cache.cache_keys();
    let o = cache.nixpush(&bed, &["gc", "--keep-within", "1d", "--nar-grace", "0s"]);
    assert_refused(&o, "00000000000000000000000000000000.narinfo");
    assert!(cache.has_narinfo(&old), "nothing deleted");
    assert_eq!(cache.cache_keys(), before);
    // The run released the cache: the next one can begin.
    fs::remove_file(dir.join("00000000000000000000000000000000.narinfo")).unwrap();
    let o = cache.nixpush(&bed, &["gc", "--keep-within", "1d", "--nar-grace", "0s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!cache.has_narinfo(&old));
}

/// A server error while marking (500 to every GET of one narinfo, through the relay, until the
/// SDK's retries give up) is not "gone": the run stops naming that narinfo, deletes nothing, and
/// leaves the cache to the next run.
#[test]
fn an_internal_error_while_marking_stops_the_run_with_nothing_deleted() {
    let bed = Bed::new();
    let cache = Cache {
        url: bed.s3.store_url(""),
        dir: bed.s3.bucket_dir(),
    };
    let old = bed.nix.build(&derivation("gc-500", "echo x > $out"))[0].clone();
    let dead = bed.nix.build(&derivation("gc-500-dead", "echo y > $out"))[0].clone();
    bed.push_ok(&cache.url, &[&old, &dead]);
    cache.age_everything();
    let key = format!("{}.narinfo", hash_part(&old));
    let relay = Relay::start(
        &bed.s3.endpoint,
        RelayConfig {
            faults: Faults {
                only: Some(RequestMatch {
                    method: "GET".into(),
                    target_contains: key.clone(),
                }),
                ..Faults::always(Fault::InternalError)
            },
            one_request_per_connection: true,
            ..RelayConfig::default()
        },
    );
    let through = Cache {
        url: bed.s3.store_url_at(&relay.endpoint, ""),
        dir: cache.dir.clone(),
    };
    let before = cache.cache_keys();
    let gc = [
        "gc",
        "--keep-within",
        "1d",
        "--nar-grace",
        "0s",
        "--no-memo",
    ];
    let o = through.nixpush(&bed, &gc);
    assert_refused(&o, &key);
    assert!(
        text(&o).contains("(HTTP 500): InternalError"),
        "{}",
        text(&o)
    );
    // The SDK tried three times before the run gave up.
    assert_eq!(relay.injected()[&Fault::InternalError], 3);
    assert_eq!(cache.cache_keys(), before, "nothing deleted");
    // The run released the cache: the next one, with the server well, collects both.
    relay.set_config(RelayConfig::default());
    let o = through.nixpush(&bed, &gc);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!cache.has_narinfo(&old) && !cache.has_narinfo(&dead));
}

/// What a reader of the bucket would fail on right now: a narinfo whose NAR or reference is
/// missing while the narinfo is still there. (A narinfo deleted while it was being looked at is
/// not a failure.)
fn broken_now(dir: &Path) -> Option<String> {
    let names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".narinfo"))
        .collect();
    for name in names {
        let Ok(text) = fs::read_to_string(dir.join(&name)) else {
            continue;
        };
        let Ok(info) = text.parse::<nixpush_format::NarInfo>() else {
            continue;
        };
        let mut missing = Vec::new();
        if !dir.join(&info.url).exists() {
            missing.push(info.url.clone());
        }
        for r in &info.references {
            let key = format!("{}.narinfo", r.hash_part());
            if !dir.join(&key).exists() {
                missing.push(key);
            }
        }
        if !missing.is_empty() && dir.join(&name).exists() {
            return Some(format!("{name} is visible without {missing:?}"));
        }
    }
    None
}

/// Collections run again and again while builds are published through the hook and by `push`,
/// each round's new closures sharing a dependency with an old, unpinned one that is dead until
/// they are published: a collection that marks it dead races the pushers that rely on it. A reader polling the bucket
/// never finds a narinfo without its NAR or references; at the end the old root is gone, the
/// shared dependency stays, and the pinned and new closures verify and substitute with Nix 2.8.
/// How the race test collects: everything older than an hour that no root needs, NARs at once.
const RACE_GC: [&str; 5] = ["--keep-within", "1h", "--nar-grace", "0s", "--json"];

#[test]
fn collections_overlapping_pushes_leave_no_hole() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut f = common::flow::Flow::new("");
    let url = f.s3.store_url("");
    let dir = f.s3.bucket_dir();
    let cache = Cache {
        url: url.clone(),
        dir: dir.clone(),
    };
    // Shared derivations, each the same expression every time it is used (no nonce), so that
    // builds of the old closures and of the new ones depend on the same outputs: one per round,
    // dead (old, unrooted) until that round's new closures are published.
    const ROUNDS: usize = 6;
    let token = nixpush_testbed::unique("race-shared");
    let shared_expr = |i: usize| {
        format!(
            "derivation {{ name = \"gc-race-shared-{i}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"echo {token}-{i} > $out\" ]; }}"
        )
    };
    let on_shared = |name: &str, i: usize| {
        format!(
            "let dep = {}; in {}",
            shared_expr(i),
            derivation(name, &format!("echo {name} ${{dep}} > $out")).replace("\\${dep}", "${dep}")
        )
    };
    let sk = f.dir.path().join("sk");
    let push = |f: &common::flow::Flow, paths: &[String]| {
        let o = f
            .nixpush()
            .args(["push", "--to", &url, "--store", &f.nix.store_url()])
            .arg("--secret-key-file")
            .arg(&sk)
            .args(paths)
            .output()
            .unwrap();
        assert!(o.status.success(), "push: {}", text(&o));
    };
    // The old closures, published through the hook as well as by `push`, then made two days old.
    f.start_daemon();
    let old: Vec<String> = (0..ROUNDS)
        .map(|i| f.build(&on_shared(&format!("gc-race-old-{i}"), i)).0[0].clone())
        .collect();
    let (pinned, _) = f.build(&derivation("gc-race-pinned", "echo pinned > $out"));
    let mut first = old.clone();
    first.push(pinned[0].clone());
    push(&f, &first);
    f.wait_published(&first);
    common::flow::wait_for("the daemon to finish its items", || {
        f.queue_items()
            .iter()
            .all(|(_, s)| *s == nixpush_queue::State::Done)
    });
    // A daemon's pushes share a session for 15 minutes, rewriting it as items come: the old
    // closures are an earlier daemon's, whose session ages with everything else.
    assert!(f.signal_daemon(libc::SIGTERM).success(), "{}", f.log());
    f.start_daemon();
    cache.age_everything();
    let shared: Vec<String> = f
        .nix
        .requisites(&old)
        .into_iter()
        .filter(|p| p.contains("gc-race-shared-"))
        .collect();
    assert_eq!(shared.len(), ROUNDS);
    let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .args(["pin", "--store", &url, "pinned", &pinned[0]])
        .envs(f.s3.credentials_env())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let stop = Arc::new(AtomicBool::new(false));
    let broken = Arc::new(Mutex::new(None::<String>));
    let reader = {
        let (stop, broken, dir) = (stop.clone(), broken.clone(), dir.clone());
        std::thread::spawn(move || {
            let mut looks = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if let Some(b) = broken_now(&dir) {
                    *broken.lock().unwrap() = Some(b);
                    break;
                }
                looks += 1;
                // A sampling interval, so the reader leaves the two cores to the others.
                std::thread::sleep(Duration::from_millis(2));
            }
            looks
        })
    };
    let collector = {
        let (stop, url, env) = (stop.clone(), url.clone(), f.s3.credentials_env());
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
                    .args(["gc", "--store", &url])
                    .args(RACE_GC)
                    .envs(env.clone())
                    .output()
                    .unwrap();
                runs.push(o);
            }
            runs
        })
    };
    let mut new = Vec::new();
    for i in 0..ROUNDS {
        let (built, _) = f.build(&on_shared(&format!("gc-race-hook-{i}"), i));
        new.extend(built);
        let (built, _) = f.build(&on_shared(&format!("gc-race-push-{i}"), i));
        push(&f, &built);
        new.extend(built);
    }
    f.wait_published(&new);
    stop.store(true, Ordering::SeqCst);
    let looks = reader.join().unwrap();
    let runs = collector.join().unwrap();
    assert!(
        broken.lock().unwrap().is_none(),
        "a reader saw a broken cache: {:?}",
        broken.lock().unwrap()
    );
    // A run may stop because another holds the fence (none here) or a read raced a deletion;
    // every run that finished deleted only what no root needed, and at least one finished.
    let finished = runs.iter().filter(|o| o.status.success()).count();
    assert!(finished > 0, "no collection finished: {}", text(&runs[0]));
    eprintln!(
        "{} collections ({finished} finished) while a reader looked {looks} times",
        runs.len()
    );

    // The old roots go in a last run (two days old, and nothing needs them).
    let o = f
        .nixpush()
        .args(["gc", "--store", &url])
        .args(RACE_GC)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for p in &old {
        assert!(!cache.has_narinfo(p), "the old root {p} is deleted");
    }
    for p in &shared {
        assert!(cache.has_narinfo(p), "the shared dependency {p} stays");
    }
    assert!(broken_now(&dir).is_none());
    let mut roots = new.clone();
    roots.push(pinned[0].clone());
    let o = f
        .nixpush()
        .args([
            "verify",
            "--store",
            &url,
            "--trusted-public-key",
            f.public.trim(),
        ])
        .args(&roots)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut delete = vec!["--delete"];
    delete.extend(old.iter().map(String::as_str));
    f.nix.run("nix-store", &delete);
    f.substitute_back(&roots, &f.nix.requisites(&roots));
}

on_every_server!(a_collection_runs_on_every_server, |kind| {
    // Everything here is fresh, so nothing is deleted: this is about the fence and the listings
    // on each server. Garage ignores conditional writes: the probe finds it, and the run is
    // refused until the operator vouches for a single collector.
    let bed = Bed::on(kind);
    let url = bed.s3.store_url("");
    let (top, dep) = bed
        .nix
        .build_pair("gc-every-dep", "echo dep > $out", "gc-every-top");
    bed.push_ok(&url, &[&top]);
    let gc = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args(["gc", "--store", &url, "--keep-within", "1h", "--json"])
            .args(extra)
            .envs(bed.s3.credentials_env())
            .output()
            .unwrap()
    };
    let o = gc(&[]);
    let o = if kind == S3Kind::Garage {
        assert_refused(&o, "ignores conditional writes");
        gc(&["--single-runner"])
    } else {
        o
    };
    assert!(o.status.success(), "{}", text(&o));
    let report = json(&o);
    assert_eq!(report["narinfos"], 2, "{report}");
    assert_eq!(report["deleted_narinfos"], 0, "{report}");
    let o = bed.verify(&url, &[&top, &dep]);
    assert!(o.status.success(), "{}", text(&o));
});
