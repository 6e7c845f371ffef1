//! Retention: `nixpush gc` and pins on caches Nix 2.8 substitutes from, against a real nix-daemon,
//! s3s-fs and directories.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use nixpush_testbed::derivation;

mod common;
use common::Bed;

fn text(o: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

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
    let gc = |extra: &[&str]| {
        let mut args = vec!["gc", "--keep-within", "1d", "--nar-grace", "0s", "--json"];
        args.extend(extra);
        cache.nixpush(bed, &args)
    };
    let o = gc(&["--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let plan = json(&o);
    assert_eq!(plan["dead"], 2, "the old root and the dead twin: {plan}");
    assert_eq!(plan["nar_garbage"], 1, "only the old root's NAR: {plan}");
    assert_eq!(cache.keys(), before, "a dry run changes nothing");

    let o = gc(&["--max-delete", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("max-delete"), "{}", text(&o));
    assert!(cache.has_narinfo(&old), "a refused plan deletes nothing");

    let o = gc(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let report = json(&o);
    assert_eq!(report["deleted_narinfos"], 2, "{report}");
    assert_eq!(report["deleted_nars"], 1, "{report}");
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
    let o = cache.nixpush(
        bed,
        &[
            "verify",
            "--trusted-public-key",
            bed.public.trim(),
            &roots[0],
            &roots[1],
            &roots[2],
        ],
    );
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
    let before = cache.keys();
    let o = cache.nixpush(&bed, &["gc", "--keep-within", "1d", "--nar-grace", "0s"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("00000000000000000000000000000000.narinfo"),
        "{}",
        text(&o)
    );
    assert!(cache.has_narinfo(&old), "nothing deleted");
    let after: Vec<String> = cache
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("nixpush/"))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|k| !k.starts_with("nixpush/"))
        .collect();
    assert_eq!(after, before);
    // The run released the cache: the next one can begin.
    fs::remove_file(dir.join("00000000000000000000000000000000.narinfo")).unwrap();
    let o = cache.nixpush(&bed, &["gc", "--keep-within", "1d", "--nar-grace", "0s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!cache.has_narinfo(&old));
}
