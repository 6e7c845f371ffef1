//! `nixpush push` end to end: real Nix 2.8 builds and substitutes, a real S3 server checks SigV4.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use nixpush_format::{NarInfo, StorePath};
use nixpush_testbed::{
    Fault, Faults, Relay, RelayConfig, RequestMatch, S3Kind, chain_and_diamond, derivation,
};

#[macro_use]
mod common;
use common::Bed;

/// The cache's own objects: without the records of pushes and collections under `nixpush/`.
fn cache_objects(keys: Vec<String>) -> Vec<String> {
    keys.into_iter()
        .filter(|k| !k.starts_with("nixpush/"))
        .collect()
}

fn hash_part(p: &str) -> String {
    p.parse::<StorePath>().unwrap().hash_part().to_owned()
}

fn round_trip_through_s3(kind: S3Kind, compression: &str) {
    let bed = Bed::on(kind);
    let roots = bed.nix.build(&chain_and_diamond());
    let closure = bed.nix.requisites(&roots);
    assert_eq!(closure.len(), 7);
    let url = bed.s3.store_url(&format!("compression={compression}"));
    let mut args: Vec<&str> = roots.iter().map(String::as_str).collect();
    args.push("--json");
    let o = bed.push(&url, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["uploaded"].as_array().unwrap().len(), 7);

    // Every narinfo is signed, names the right compression, and points at an existing NAR.
    for p in &closure {
        let text = bed.s3.get(&format!("{}.narinfo", hash_part(p))).unwrap();
        let info: NarInfo = String::from_utf8(text).unwrap().parse().unwrap();
        assert_eq!(info.compression, compression);
        assert!(bed.s3.exists(&info.url), "{} missing", info.url);
        assert_eq!(info.sigs.len(), 1);
    }
    assert!(bed.s3.exists("nix-cache-info"));

    let verify = bed
        .nix
        .cmd("nix")
        .args([
            "store",
            "verify",
            "--store",
            &bed.s3.http_url,
            "-r",
            "--sigs-needed",
            "1",
        ])
        .args(["--option", "trusted-public-keys", &bed.public])
        .args(&roots)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "nix store verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let (ok, err) = bed.substitute(&bed.s3.http_url, &roots, &closure);
    assert!(ok, "substitution failed: {err}");
    for p in &closure {
        assert!(bed.nix.is_valid(p), "{p} not substituted");
    }
    // The substituted tree is the built one: the executable still runs.
    let hello = format!("{}/bin/hello", roots[0]);
    assert!(fs::metadata(&hello).unwrap().permissions().mode() & 0o100 != 0);
}

on_every_server!(chain_and_diamond_through_s3_zstd, |kind| {
    round_trip_through_s3(kind, "zstd")
});
on_every_server!(chain_and_diamond_through_s3_xz, |kind| {
    round_trip_through_s3(kind, "xz")
});
on_every_server!(chain_and_diamond_through_s3_uncompressed, |kind| {
    round_trip_through_s3(kind, "none")
});

#[test]
fn chain_and_diamond_through_a_file_cache() {
    let bed = Bed::new();
    let roots = bed.nix.build(&chain_and_diamond());
    let closure = bed.nix.requisites(&roots);
    let dir = bed.dir.path().join("file-cache");
    let url = format!("file://{}?compression=xz", dir.display());
    let args: Vec<&str> = roots.iter().map(String::as_str).collect();
    bed.push_ok(&url, &args);
    assert!(dir.join("nix-cache-info").is_file());
    let (ok, err) = bed.substitute(&format!("file://{}", dir.display()), &roots, &closure);
    assert!(ok, "substitution from file:// failed: {err}");
}

/// Regression: objects were created 0600 (through tempfile), so the web server serving a
/// `file://` cache as another user answered 403 and Nix rebuilt everything without saying why.
#[test]
fn a_file_cache_is_readable_by_another_user_whatever_the_umask() {
    let bed = Bed::new();
    let out = bed.nix.build(&derivation("readable", "echo r > $out"));
    // The test's own directory is 0700; the cache's parent must let the reader through.
    let parent = bed.dir.path().join("served");
    fs::create_dir(&parent).unwrap();
    fs::set_permissions(bed.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();
    // Two levels that do not exist yet: both must be made readable.
    let dir = parent.join("new").join("cache");
    let url = format!("file://{}", dir.display());
    let o = Command::new("sh")
        .args(["-c", "umask 077 && exec \"$@\"", "sh"])
        .arg(env!("CARGO_BIN_EXE_nixpush"))
        .args(["push", "--store", &bed.nix.store_url(), "--to", &url])
        .args(["--secret-key-file", &bed.secret, &out[0]])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut read = 0;
    for entry in walk(&dir) {
        let as_nobody = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat"])
            .arg(&entry)
            .output()
            .unwrap();
        assert!(
            as_nobody.status.success(),
            "nobody cannot read {}: {}",
            entry.display(),
            String::from_utf8_lossy(&as_nobody.stderr)
        );
        read += 1;
    }
    // nix-cache-info, the narinfo, the NAR and the push's session record.
    assert_eq!(read, 4);
}

/// Every regular file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Regression: two paths with byte-identical NARs share one content-addressed object, and writing
/// it twice at once must not fail (the file target once used one temporary name per key).
#[test]
fn identical_nars_are_shared_by_paths_pushed_together() {
    let bed = Bed::new();
    let roots = bed.nix.build(&format!(
        "[ ({}) ({}) ({}) ]",
        derivation("same-a", "echo same > $out"),
        derivation("same-b", "echo same > $out"),
        derivation("same-c", "echo same > $out"),
    ));
    let dir = bed.dir.path().join("file-cache");
    let args: Vec<&str> = roots.iter().map(String::as_str).collect();
    for url in [bed.s3.store_url(""), format!("file://{}", dir.display())] {
        bed.push_ok(&url, &args);
    }
    let nars = |keys: Vec<String>| keys.iter().filter(|k| k.starts_with("nar/")).count();
    assert_eq!(bed.narinfos().len(), 3);
    assert_eq!(nars(bed.s3.keys()), 1);
    let file_nars = fs::read_dir(dir.join("nar")).unwrap().count();
    assert_eq!(
        (
            fs::read_dir(&dir)
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "narinfo"))
                .count(),
            file_nars
        ),
        (3, 1)
    );
}

#[test]
fn a_second_push_uploads_nothing_and_says_so() {
    let bed = Bed::new();
    let roots = bed.nix.build(&chain_and_diamond());
    let url = bed.s3.store_url("");
    let args: Vec<&str> = roots.iter().map(String::as_str).collect();
    bed.push_ok(&url, &args);
    let before: Vec<_> = cache_objects(bed.s3.keys())
        .iter()
        .map(|k| {
            (
                k.clone(),
                fs::metadata(bed.s3.object(k)).unwrap().modified().unwrap(),
            )
        })
        .collect();
    let err = bed.push_ok(&url, &args);
    assert!(
        err.contains("nothing to upload: all 7 paths are already in"),
        "{err}"
    );
    let after: Vec<_> = cache_objects(bed.s3.keys())
        .iter()
        .map(|k| {
            (
                k.clone(),
                fs::metadata(bed.s3.object(k)).unwrap().modified().unwrap(),
            )
        })
        .collect();
    assert_eq!(before, after, "the second push rewrote objects");
}

/// A push of many paths asks the bucket by listing it (pages from just before each run of paths,
/// not a HEAD per path): what it finds is not uploaded again, what it does not is.
fn half_a_closure_in_the_cache(kind: S3Kind) {
    let bed = Bed::on(kind);
    let expr = format!(
        "builtins.genList (i: {}) 40",
        // Forty outputs, told apart by `i`.
        derivation("wide-leaf", "echo $i > $out")
            .replace("derivation {", "derivation { i = toString i;")
    );
    let paths = bed.nix.build(&expr);
    assert_eq!(paths.len(), 40);
    let url = bed.s3.store_url("");
    let half: Vec<&str> = paths.iter().step_by(2).map(String::as_str).collect();
    bed.push_ok(&url, &half);
    // Through a relay that answers every HEAD of a narinfo with 500: only a push that lists
    // instead can tell which paths are there.
    let relay = Relay::start(
        &bed.s3.endpoint,
        RelayConfig {
            faults: Faults {
                only: Some(RequestMatch {
                    method: "HEAD".into(),
                    target_contains: ".narinfo".into(),
                }),
                ..Faults::always(Fault::InternalError)
            },
            one_request_per_connection: true,
            ..RelayConfig::default()
        },
    );
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    args.push("--json");
    let o = bed.push(&bed.s3.store_url_at(&relay.endpoint, ""), &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        relay.injected().get(&Fault::InternalError),
        None,
        "{kind:?}: a narinfo was asked about"
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let listed = |field: &str| -> std::collections::BTreeSet<String> {
        report[field]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let odd: std::collections::BTreeSet<String> =
        paths.iter().skip(1).step_by(2).cloned().collect();
    let even: std::collections::BTreeSet<String> = half.iter().map(|p| p.to_string()).collect();
    assert_eq!(listed("uploaded"), odd, "{kind:?}: uploaded");
    assert_eq!(listed("already_present"), even, "{kind:?}: found present");
    for p in &paths {
        assert!(bed.s3.exists(&format!("{}.narinfo", hash_part(p))), "{p}");
    }
}

on_every_server!(half_a_closure_in_the_cache_is_found_by_listing, |kind| {
    half_a_closure_in_the_cache(kind)
});

#[test]
fn a_tampered_narinfo_is_refused_by_nix() {
    for (what, tamper) in [
        (
            "NarHash",
            Box::new(|t: &str| {
                let line = t.lines().find(|l| l.starts_with("NarHash: ")).unwrap();
                let mut h = line.to_owned();
                let last = h.pop().unwrap();
                h.push(if last == '0' { '1' } else { '0' });
                t.replace(line, &h)
            }) as Box<dyn Fn(&str) -> String>,
        ),
        (
            "Sig",
            Box::new(|t: &str| {
                let line = t.lines().find(|l| l.starts_with("Sig: ")).unwrap();
                let i = line.len() - 5;
                let mut s = line.to_owned();
                let c = if &s[i..i + 1] == "A" { "B" } else { "A" };
                s.replace_range(i..i + 1, c);
                t.replace(line, &s)
            }),
        ),
    ] {
        let bed = Bed::new();
        let out = bed.nix.build(&derivation("tamper", "echo tamper > $out"));
        bed.push_ok(&bed.s3.store_url(""), &[&out[0]]);
        let file = bed.s3.object(&format!("{}.narinfo", hash_part(&out[0])));
        let text = fs::read_to_string(&file).unwrap();
        let tampered = tamper(&text);
        assert_ne!(text, tampered);
        fs::write(&file, tampered).unwrap();
        let (ok, err) = bed.substitute(&bed.s3.http_url, &out, &out);
        assert!(!ok, "Nix accepted a narinfo with a changed {what}");
        assert!(!bed.nix.is_valid(&out[0]), "{what}: {err}");
    }
}

#[test]
fn a_corrupt_store_path_is_refused_and_nothing_of_it_is_published() {
    let bed = Bed::new();
    let (top, dep) = bed.nix.build_pair(
        "corrupt-dep",
        "mkdir $out && echo original > $out/data",
        "corrupt-top",
    );
    // Change the contents behind the store's back (root can write to the read-only store).
    fs::write(Path::new(&dep).join("data"), "tampered\n").unwrap();

    let o = bed.push(&bed.s3.store_url(""), &[&dep]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("refusing to upload {dep}")) && err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(
        cache_objects(bed.s3.keys()),
        vec!["nix-cache-info".to_owned()],
        "nothing of a corrupt path may be uploaded"
    );

    // Its dependents are not published either: their narinfos would promise a closure the cache
    // cannot deliver.
    let o = bed.push(&bed.s3.store_url(""), &[&top]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("not publishing {top}")), "{err}");
    assert!(bed.narinfos().is_empty(), "{:?}", bed.narinfos());
    bed.nix.delete(&top);
    bed.nix.delete(&dep);
}

fn assert_fails_cleanly(bed: &Bed, o: Output, expect: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert!(
        bed.narinfos().is_empty(),
        "a narinfo was written: {:?}",
        bed.narinfos()
    );
}

on_every_server!(
    bad_credentials_bucket_endpoint_and_parameters_are_distinct_errors,
    distinct_errors
);
fn distinct_errors(kind: S3Kind) {
    let bed = Bed::on(kind);
    let out = bed.nix.build(&derivation("errors", "echo e > $out"));
    let path = out[0].as_str();
    let url = bed.s3.store_url("");

    let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .args(["push", "--store", &bed.nix.store_url(), "--to", &url, path])
        .envs(bed.s3.credentials_env())
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .unwrap();
    assert_fails_cleanly(&bed, o, "access denied to bucket `cache`");

    let missing = url.replace("s3://cache?", "s3://no-such-bucket?");
    assert_fails_cleanly(
        &bed,
        bed.push(&missing, &[path]),
        "bucket `no-such-bucket` does not exist",
    );

    let dead = format!(
        "s3://cache?endpoint=http://127.0.0.1:1&region={}",
        bed.s3.region
    );
    assert_fails_cleanly(
        &bed,
        bed.push(&dead, &[path]),
        "cannot reach the S3 endpoint http://127.0.0.1:1",
    );

    assert_fails_cleanly(
        &bed,
        bed.push(&format!("{url}&compresion=xz"), &[path]),
        "parameter `compresion` is unknown",
    );

    let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .args(["push", "--store", &bed.nix.store_url(), "--to", &url, path])
        .envs(bed.s3.credentials_env())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    assert_fails_cleanly(&bed, o, "no AWS credentials found");

    let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .args([
            "push",
            "--store",
            &bed.nix.store_url(),
            "--to",
            &url,
            "--secret-key-file",
            "/no/such/key",
            path,
        ])
        .envs(bed.s3.credentials_env())
        .output()
        .unwrap();
    assert_fails_cleanly(&bed, o, "cannot read secret key file /no/such/key");

    let o = bed.push(&url, &["/tmp"]);
    assert_fails_cleanly(&bed, o, "/tmp is not in the Nix store");

    // After all that, the same command with the right settings works.
    bed.push_ok(&url, &[path]);
    assert_eq!(bed.narinfos().len(), 1);
}

/// A bucket name S3 does not allow: s3s-fs answers HeadBucket with a bare 400, which says nothing
/// about the name; nixpush names the rule it breaks.
#[test]
fn a_bucket_name_s3_refuses_is_named_with_the_rule() {
    let bed = Bed::new();
    let out = bed.nix.build(&derivation("bucket-name", "echo b > $out"));
    let url = bed.s3.store_url("").replacen("s3://cache?", "s3://b1?", 1);
    assert_fails_cleanly(
        &bed,
        bed.push(&url, &[&out[0]]),
        "the server refused bucket `b1` (HTTP 400); S3 bucket names are 3 to 63 characters",
    );
}

/// Regression: Garage answers a HeadBucket signed for another region with a bare 400 (a HEAD has no
/// body), which nixpush reported as a bare HTTP 400 to its HeadBucket.
#[test]
fn a_wrong_region_is_named_with_the_buckets_own() {
    // Garage checks the region of a signature; s3s-fs and moto accept any.
    let bed = Bed::on(S3Kind::Garage);
    let out = bed.nix.build(&derivation("region", "echo r > $out"));
    let url = bed
        .s3
        .store_url("")
        .replace("region=garage", "region=eu-west-1");
    assert_fails_cleanly(
        &bed,
        bed.push(&url, &[&out[0]]),
        "bucket `cache` is in region `garage`, not `eu-west-1`: set region=garage in the store URL",
    );
}

on_every_server!(
    a_large_path_goes_up_in_parts_and_substitutes_back,
    large_path_round_trip
);
fn large_path_round_trip(kind: S3Kind) {
    let bed = Bed::on(kind);
    // 24 MiB of incompressible data: five 5 MiB parts with the thresholds below.
    let out = bed.nix.build(&derivation(
        "large",
        "mkdir $out && head -c 25165824 /dev/urandom > $out/blob",
    ));
    let url = bed.s3.store_url(
        "compression=none&multipart-upload=true&multipart-threshold=5242880&multipart-chunk-size=5242880",
    );
    let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .args(["push", "--store", &bed.nix.store_url(), "--to", &url])
        .args(["--secret-key-file", &bed.secret, &out[0]])
        .envs(bed.s3.credentials_env())
        .env("NIXPUSH_LOG", "nixpush_cache=debug")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("24.00 MiB NAR"), "{err}");
    assert!(
        err.contains("multipart upload") && err.contains("parts=5"),
        "{err}"
    );
    let (ok, err) = bed.substitute(&bed.s3.http_url, &out, &out);
    assert!(ok, "{err}");
}

#[test]
fn paths_signed_by_an_upstream_key_are_skipped() {
    let bed = Bed::new();
    let (top, dep) = bed
        .nix
        .build_pair("upstream-dep", "echo dep > $out", "upstream-top");
    let upstream = bed.dir.path().join("upstream.sk");
    nixpush_testbed::check(
        "keygen",
        Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args([
                "keygen",
                "upstream-1",
                upstream.to_str().unwrap(),
                bed.dir.path().join("upstream.pk").to_str().unwrap(),
            ])
            .output()
            .unwrap(),
    );
    bed.nix.run(
        "nix",
        &[
            "store",
            "sign",
            "--key-file",
            upstream.to_str().unwrap(),
            &dep,
        ],
    );
    let err = bed.push_ok(
        &bed.s3.store_url(""),
        &[&top, "--skip-signed-by", "upstream-1"],
    );
    assert!(
        err.contains(&format!("skipped  {dep} (signed by upstream-1)")),
        "{err}"
    );
    assert_eq!(bed.narinfos(), vec![format!("{}.narinfo", hash_part(&top))]);

    // Regression: verify reported the reference left out as missing (exit 1) on a correct cache.
    let verify = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args(["verify", "--store", &bed.s3.store_url("")])
            .args(["--trusted-public-key", &bed.public, &top])
            .args(extra)
            .envs(bed.s3.credentials_env())
            .env("NIX_REMOTE", bed.nix.store_url())
            .output()
            .unwrap()
    };
    let o = verify(&[]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let o = verify(&["--skip-signed-by", "upstream-1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("left to upstream caches: 1 signed by upstream-1"),
        "{err}"
    );
    let all = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .args(["verify", "--store", &bed.s3.store_url(""), "--all"])
        .args(["--trusted-public-key", &bed.public])
        .args(["--skip-signed-by", "upstream-1"])
        .envs(bed.s3.credentials_env())
        .env("NIX_REMOTE", bed.nix.store_url())
        .output()
        .unwrap();
    assert_eq!(all.status.code(), Some(0), "{all:?}");
}

#[test]
fn result_symlinks_and_derivations_name_their_outputs() {
    let bed = Bed::new();
    let out = bed.nix.build(&derivation("by-link", "echo l > $out"))[0].clone();
    let link = bed.dir.path().join("result");
    std::os::unix::fs::symlink(&out, &link).unwrap();
    bed.push_ok(&bed.s3.store_url(""), &[link.to_str().unwrap()]);
    assert_eq!(bed.narinfos(), vec![format!("{}.narinfo", hash_part(&out))]);

    let out2 = bed.nix.build(&derivation("by-drv", "echo d > $out"))[0].clone();
    let drv = bed.nix.run("nix-store", &["--query", "--deriver", &out2]);
    bed.push_ok(&bed.s3.store_url(""), &[drv.trim()]);
    assert!(
        bed.narinfos()
            .contains(&format!("{}.narinfo", hash_part(&out2)))
    );
    assert!(
        !bed.narinfos()
            .contains(&format!("{}.narinfo", hash_part(drv.trim()))),
        "the .drv itself is not pushed"
    );
}

/// Regression: S3 requests had no deadline but the connect timeout, so one connection that the
/// server (or a middlebox) stopped answering froze a push, and the daemon's batch, for good.
#[test]
fn a_stalled_connection_costs_a_retry_not_the_push() {
    let bed = Bed::new();
    let roots = bed.nix.build(&chain_and_diamond());
    // The first two HEADs are read and never answered: the first attempt at the bucket's check
    // and its first retry.
    let relay = stalling_heads(&bed, Some(2));
    let url = bed.s3.store_url_at(&relay.endpoint, "");
    let mut push = bed.spawn_push(&url, &roots, std::process::Stdio::piped());
    // Two 30 s deadlines and the push itself; without deadlines it never ends.
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let status = loop {
        if let Some(status) = push.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > limit {
            let _ = push.kill();
            panic!("the push still hangs after 300 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut push.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert_eq!(relay.injected().get(&Fault::Stall), Some(&2));
    assert_eq!(bed.narinfos().len(), 7);
}

/// The bucket is checked while `nix-cache-info` is read, not before it: a push starts a round trip
/// sooner. Through a relay that never answers HeadBucket, the read still arrives.
#[test]
fn the_bucket_is_checked_while_the_cache_info_is_read() {
    let bed = Bed::new();
    let roots = bed.nix.build(&chain_and_diamond());
    let relay = stalling_heads(&bed, None);
    let url = bed.s3.store_url_at(&relay.endpoint, "");
    let mut push = bed.spawn_push(&url, &roots, std::process::Stdio::null());
    // Until the check is answered, the push sends one request besides it: the read. A push that
    // waited for the check sends none before it gives up on the bucket and exits; one that did not
    // check at all is past its session and the collector's state by its first HEAD.
    let (stalled, through) = loop {
        let log = relay.connections();
        let stalled = log.iter().any(|(_, fault)| *fault == Some(Fault::Stall));
        let through = log.iter().filter(|(_, fault)| fault.is_none()).count();
        if (stalled && through > 0) || push.try_wait().unwrap().is_some() {
            break (stalled, through);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = push.kill();
    let _ = push.wait();
    assert!(stalled, "no HEAD was sent");
    assert_eq!(
        through, 1,
        "requests let through while the bucket check went unanswered"
    );
}

/// A relay in front of the bed's S3 server that reads HEADs (the first `limit` of them, or all)
/// and never answers them; every request comes on a connection of its own, so every HEAD is seen.
fn stalling_heads(bed: &Bed, limit: Option<usize>) -> Relay {
    Relay::start(
        &bed.s3.endpoint,
        RelayConfig {
            faults: Faults {
                limit,
                only: Some(RequestMatch {
                    method: "HEAD".into(),
                    target_contains: String::new(),
                }),
                ..Faults::always(Fault::Stall)
            },
            one_request_per_connection: true,
            ..RelayConfig::default()
        },
    )
}

/// Regression: a huge `--jobs` panicked instead of being refused.
#[test]
fn jobs_out_of_range_is_a_usage_error() {
    for jobs in ["0", "99999999999", "many"] {
        let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args(["push", "--to", "file:///nonexistent", "--jobs", jobs])
            .arg("/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-x")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("--jobs") && err.contains(jobs), "{err}");
    }
}

/// Regression: PUTs carried no checksum, so a bit flipped on the way (a faulty NIC, a middlebox)
/// was stored under the key of the bytes that were meant, and Nix refused the NAR long after.
/// (moto checks neither Content-MD5 nor the signed payload hash, so it cannot tell.)
#[test]
fn a_body_corrupted_in_transit_never_lands_on_s3s_fs() {
    corrupted_in_transit(S3Kind::S3sFs)
}

#[test]
fn a_body_corrupted_in_transit_never_lands_on_garage() {
    corrupted_in_transit(S3Kind::Garage)
}

fn corrupted_in_transit(kind: S3Kind) {
    let bed = Bed::on(kind);
    bed.s3.put("nix-cache-info", b"StoreDir: /nix/store\n");
    // A small NAR (one PUT from memory) and a large one (a PUT from the spool file), both longer
    // than the push's session record, which goes through untouched.
    let small = bed.nix.build(&derivation(
        "flip-small",
        "head -c 16384 /dev/urandom > $out",
    ));
    let large = bed.nix.build(&derivation(
        "flip-large",
        "head -c 3145728 /dev/urandom > $out",
    ));
    let relay = Relay::start(
        &bed.s3.endpoint,
        RelayConfig {
            faults: Faults {
                corrupt_min_body: 4096,
                ..Faults::always(Fault::Corrupt)
            },
            ..RelayConfig::default()
        },
    );
    let url = bed.s3.store_url_at(&relay.endpoint, "compression=none");
    let o = bed.push(&url, &[&small[0], &large[0]]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        relay.injected().get(&Fault::Corrupt).copied().unwrap_or(0) >= 2,
        "{:?}",
        relay.injected()
    );
    // Whatever landed holds the bytes its key names.
    for key in bed.s3.keys() {
        let Some(name) = key.strip_prefix("nar/") else {
            continue;
        };
        let body = bed.s3.get(&key).unwrap();
        let hash = nixpush_format::Sha256::digest(&body).to_nix32();
        assert_eq!(name, format!("{hash}.nar"), "{key} holds other bytes");
    }
    assert!(bed.narinfos().is_empty(), "{:?}", bed.narinfos());
    // Through a sound link the same push completes and substitutes back.
    bed.push_ok(
        &bed.s3.store_url("compression=none"),
        &[&small[0], &large[0]],
    );
    let roots = [small[0].clone(), large[0].clone()];
    let (ok, err) = bed.substitute(&bed.s3.http_url, &roots, &roots);
    assert!(ok, "{err}");
}

on_every_server!(
    a_truncated_nar_in_the_cache_is_replaced,
    truncated_nar_replaced
);
/// Regression: an existing NAR object of 1 MiB or more was trusted by name alone, so one a server
/// acknowledged and then lost the end of was never repaired, whatever was pushed again.
fn truncated_nar_replaced(kind: S3Kind) {
    let bed = Bed::on(kind);
    let out = bed.nix.build(&derivation(
        "truncated",
        "head -c 2097152 /dev/urandom > $out",
    ));
    let url = bed.s3.store_url("compression=none");
    bed.push_ok(&url, &[&out[0]]);
    let narinfo = format!("{}.narinfo", hash_part(&out[0]));
    let info: NarInfo = String::from_utf8(bed.s3.get(&narinfo).unwrap())
        .unwrap()
        .parse()
        .unwrap();
    let whole = bed.s3.get(&info.url).unwrap();
    bed.s3.put(&info.url, &whole[..whole.len() / 2]);
    bed.s3.delete(&narinfo);
    bed.push_ok(&url, &[&out[0]]);
    assert_eq!(bed.s3.get(&info.url).unwrap(), whole);
    let (ok, err) = bed.substitute(&bed.s3.http_url, &out, &out);
    assert!(ok, "{err}");
}

/// Regression: `nixpush push` kept no journal of its multipart uploads, so Ctrl-C during a large
/// upload left a billed, invisible upload behind for good; and it spooled to `$TMPDIR`.
#[test]
fn an_interrupted_or_killed_push_leaves_no_multipart_upload_behind() {
    let bed = Bed::on(S3Kind::Garage);
    let out = bed.nix.build(&derivation(
        "interrupted",
        "head -c 31457280 /dev/urandom > $out",
    ));
    // 30 MiB at 4 MB/s: several seconds of parts in flight.
    let relay = Relay::start(
        &bed.s3.endpoint,
        RelayConfig {
            upstream_bytes_per_sec: Some(4_000_000),
            ..RelayConfig::default()
        },
    );
    let url = bed.s3.store_url_at(
        &relay.endpoint,
        "compression=none&multipart-upload=true&multipart-threshold=5242880&multipart-chunk-size=5242880",
    );
    let spool = bed.dir.path().join("spool-root");
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_nixpush"))
            .args(["push", "--store", &bed.nix.store_url(), "--to", &url])
            .args(["--secret-key-file", &bed.secret, "--spool-dir"])
            .arg(&spool)
            .arg(&out[0])
            .envs(bed.s3.credentials_env())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A push's run directory is named `PID-NANOS`.
    let run_dir = |pid: u32| {
        fs::read_dir(&spool)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pid}-")))
            })
    };
    let journaled = |pid: u32| {
        run_dir(pid).is_some_and(|d| {
            fs::read_dir(d.join("multipart")).is_ok_and(|mut d| d.next().is_some())
        })
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let limit = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !cond() {
            assert!(
                std::time::Instant::now() < limit,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };

    // Ctrl-C: the push aborts its upload itself.
    let push = start();
    let pid = push.id();
    wait("a multipart upload to start", &|| journaled(pid));
    assert_eq!(bed.s3.multipart_uploads().len(), 1);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let o = push.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted by SIGINT") && err.contains("aborted 1 multipart"),
        "{err}"
    );
    assert_eq!(bed.s3.multipart_uploads(), Vec::<String>::new());
    assert!(run_dir(pid).is_none(), "run directory left behind");
    assert!(bed.narinfos().is_empty());

    // SIGKILL: the upload stays until the next push to the same cache aborts it.
    let mut push = start();
    let pid = push.id();
    wait("a multipart upload to start", &|| journaled(pid));
    push.kill().unwrap();
    push.wait().unwrap();
    assert_eq!(bed.s3.multipart_uploads().len(), 1);
    let o = start().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("aborted 1 multipart uploads left by an earlier push"),
        "{err}"
    );
    assert_eq!(bed.s3.multipart_uploads(), Vec::<String>::new());
    assert_eq!(bed.narinfos().len(), 1);
    assert_eq!(
        fs::read_dir(&spool).unwrap().count(),
        0,
        "run directories left behind"
    );
}
