//! `nixpush verify` against caches written by nixpush and by Nix 2.8's own `nix copy`, served by a
//! real S3 server (SigV4 and anonymous HTTP) and from directories; then with faults injected.

use std::collections::BTreeSet;
use std::fs;
use std::process::{Command, Output};

use nixpush_format::{NarInfo, SecretKey, StorePath};
use nixpush_testbed::{S3Kind, chain_and_diamond, derivation};
use serde_json::Value;

#[macro_use]
mod common;
use common::Bed;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs verify with --json and returns the exit code and the report.
fn verify_json(bed: &Bed, store: &str, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let o = bed.verify(store, &all);
    let report = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}); stderr: {}", text(&o.stderr)));
    (o.status.code(), report)
}

/// (subject, kind) of every problem in a report.
fn problems(report: &Value) -> BTreeSet<(String, String)> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["subject"].as_str().unwrap().to_owned(),
                p["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn assert_clean(bed: &Bed, store: &str, args: &[&str], narinfos: u64, key: &str) {
    let (code, report) = verify_json(bed, store, args);
    assert_eq!(code, Some(0), "{store} {args:?}: {report:#}");
    assert!(problems(&report).is_empty(), "{report:#}");
    assert_eq!(report["narinfos"], narinfos, "{report:#}");
    assert_eq!(report["signed_by"][key], narinfos, "{report:#}");
    assert!(report["nar_bytes"].as_u64().unwrap() > 0);
}

fn hash_part(p: &str) -> String {
    p.parse::<StorePath>().unwrap().hash_part().to_owned()
}

on_every_server!(
    caches_written_by_nixpush_verify_clean_over_s3_http_and_file,
    nixpush_caches_verify_clean
);
fn nixpush_caches_verify_clean(kind: S3Kind) {
    let bed = Bed::on(kind);
    let roots = bed.nix.build(&chain_and_diamond());
    let args: Vec<&str> = roots.iter().map(String::as_str).collect();
    let s3 = bed.s3.store_url("compression=zstd");
    bed.push_ok(&s3, &args);
    let dir = bed.dir.path().join("file-cache");
    let file = format!("file://{}", dir.display());
    bed.push_ok(&format!("{file}?compression=xz"), &args);

    for store in [s3.as_str(), bed.s3.http_url.as_str(), file.as_str()] {
        assert_clean(&bed, store, &args, 7, "nixpush-test-1");
    }
    // The closure is followed from one root alone.
    let closure = bed.nix.requisites(&roots[..1]).len() as u64;
    assert!(closure > 1);
    assert_clean(&bed, &s3, &args[..1], closure, "nixpush-test-1");
    assert_clean(&bed, &file, &["--all"], 7, "nixpush-test-1");
    let (code, report) = verify_json(&bed, &s3, &["--all"]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["narinfos"], 7);
    // Paths with identical contents share a NAR object, which is read once.
    let nar_objects = bed
        .s3
        .keys()
        .iter()
        .filter(|k| k.starts_with("nar/"))
        .count();
    assert_eq!(report["nars"], nar_objects as u64);

    // Without --json: nothing on stdout, a summary naming the key on stderr.
    let o = bed.verify(&s3, &args);
    assert!(o.status.success());
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    let err = text(&o.stderr);
    assert!(
        err.contains(&format!("verified 7 narinfos and {nar_objects} NARs"))
            && err.contains("no problems")
            && err.contains("signed by nixpush-test-1 (7)"),
        "{err}"
    );
}

#[test]
fn caches_written_by_nix_copy_verify_clean() {
    let bed = Bed::new();
    let roots = bed.nix.build(&chain_and_diamond());
    let dir = bed.dir.path().join("nix-copy-cache");
    let file = format!("file://{}", dir.display());
    // Nix 2.8's own uploads: xz to a directory, and HTTP PUTs to the server's anonymous side.
    for to in [&file, &bed.s3.http_url] {
        let mut copy = bed.nix.cmd("nix");
        copy.args(["copy", "--to", &format!("{to}?secret-key={}", bed.secret)])
            .args(&roots);
        nixpush_testbed::check("nix copy", copy.output().unwrap());
    }
    let nix_narinfo: NarInfo =
        fs::read_to_string(dir.join(format!("{}.narinfo", hash_part(&roots[0]))))
            .unwrap()
            .parse()
            .unwrap();
    assert_eq!(nix_narinfo.compression, "xz", "Nix 2.8 wrote this cache");
    let args: Vec<&str> = roots.iter().map(String::as_str).collect();
    assert_clean(&bed, &file, &args, 7, "nixpush-test-1");
    assert_clean(&bed, &file, &["--all"], 7, "nixpush-test-1");
    assert_clean(&bed, &bed.s3.http_url, &args, 7, "nixpush-test-1");
    assert_clean(&bed, &bed.s3.store_url(""), &["--all"], 7, "nixpush-test-1");
}

/// Rewrites a narinfo in place through `change`, re-signing it with `key` when given.
fn edit_narinfo(
    path: &std::path::Path,
    key: Option<&SecretKey>,
    change: impl FnOnce(&mut NarInfo),
) {
    let mut info: NarInfo = fs::read_to_string(path).unwrap().parse().unwrap();
    change(&mut info);
    if let Some(key) = key {
        info.sigs.clear();
        info.sign(key).unwrap();
    }
    fs::write(path, info.to_string()).unwrap();
}

#[test]
fn each_injected_fault_is_found_and_named() {
    let bed = Bed::new();
    let names = [
        "flipped",
        "truncated",
        "no-nar",
        "wrong-hash",
        "bad-sig",
        "untrusted",
        "fine",
    ];
    let exprs: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                "({})",
                derivation(&format!("fault-{n}"), &format!("echo {n} > $out"))
            )
        })
        .collect();
    let paths = bed.nix.build(&format!("[ {} ]", exprs.join(" ")));
    let (top, dep) = bed
        .nix
        .build_pair("fault-dep", "echo dep > $out", "fault-top");
    let mut all: Vec<&str> = paths.iter().map(String::as_str).collect();
    all.push(&top);
    // Uncompressed, so that a flipped byte survives to be caught by the hashes rather than the
    // decompressor; truncation of a compressed NAR is checked in the unit tests.
    let url = bed.s3.store_url("compression=none");
    bed.push_ok(&url, &all);
    assert_clean(&bed, &url, &all, 9, "nixpush-test-1");

    let path = |n: &str| paths[names.iter().position(|x| *x == n).unwrap()].clone();
    let narinfo_file = |p: &str| bed.s3.object(&format!("{}.narinfo", hash_part(p)));
    let nar_of = |p: &str| {
        let info: NarInfo = fs::read_to_string(narinfo_file(p))
            .unwrap()
            .parse()
            .unwrap();
        info.url
    };
    let ours: SecretKey = fs::read_to_string(&bed.secret).unwrap().parse().unwrap();
    let stranger = SecretKey::generate("stranger-1").unwrap();

    // A flipped byte in the middle of a NAR.
    let f = bed.s3.object(&nar_of(&path("flipped")));
    let mut bytes = fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&f, bytes).unwrap();
    // A NAR cut short.
    let f = bed.s3.object(&nar_of(&path("truncated")));
    let len = fs::metadata(&f).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 16)
        .unwrap();
    // A NAR gone.
    let missing_nar = nar_of(&path("no-nar"));
    fs::remove_file(bed.s3.object(&missing_nar)).unwrap();
    // A narinfo whose NarHash is wrong, though properly signed (a buggy uploader).
    edit_narinfo(&narinfo_file(&path("wrong-hash")), Some(&ours), |i| {
        i.nar_hash = nixpush_format::Sha256::digest(b"something else");
    });
    // A signature that does not verify.
    let f = narinfo_file(&path("bad-sig"));
    let t = fs::read_to_string(&f).unwrap();
    let sig = t
        .lines()
        .find(|l| l.starts_with("Sig: "))
        .unwrap()
        .to_owned();
    let i = sig.len() - 10;
    let mut bad = sig.clone();
    bad.replace_range(i..i + 1, if &sig[i..i + 1] == "A" { "B" } else { "A" });
    fs::write(&f, t.replace(&sig, &bad)).unwrap();
    // A valid signature, by a key nobody trusts.
    edit_narinfo(&narinfo_file(&path("untrusted")), Some(&stranger), |_| {});
    // A reference whose narinfo is gone (its NAR stays, and becomes an orphan).
    let dep_nar = nar_of(&dep);
    fs::remove_file(narinfo_file(&dep)).unwrap();
    // A NAR no narinfo points to.
    let orphan = "nar/0000000000000000000000000000000000000000000000000000.nar";
    fs::write(bed.s3.object(orphan), b"orphan").unwrap();

    let expected: BTreeSet<(String, String)> = [
        (path("flipped"), "file_hash_mismatch"),
        (path("truncated"), "file_size_mismatch"),
        (path("no-nar"), "nar_missing"),
        (path("wrong-hash"), "nar_hash_mismatch"),
        (path("bad-sig"), "bad_signature"),
        (path("untrusted"), "untrusted_signatures"),
        (top.clone(), "reference_missing"),
    ]
    .into_iter()
    .map(|(s, k)| (s, k.to_owned()))
    .collect();

    // Following closures from the paths.
    let (code, report) = verify_json(&bed, &url, &all);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(problems(&report), expected, "{report:#}");

    // The whole bucket: the same, plus the two NARs nothing points to.
    let (code, report) = verify_json(&bed, &url, &["--all"]);
    assert_eq!(code, Some(1), "{report:#}");
    let mut with_orphans = expected.clone();
    with_orphans.insert((orphan.to_owned(), "orphan_nar".to_owned()));
    with_orphans.insert((dep_nar, "orphan_nar".to_owned()));
    assert_eq!(problems(&report), with_orphans, "{report:#}");

    // The human report: one line per problem on stdout, naming the path and the problem.
    let o = bed.verify(&url, &all);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert_eq!(out.lines().count(), expected.len(), "{out}");
    for (needle_path, needle) in [
        (path("flipped"), "is corrupt: its hash is"),
        (path("truncated"), "is truncated"),
        (
            path("no-nar"),
            &format!("NAR object {missing_nar} is missing") as &str,
        ),
        (path("wrong-hash"), "narinfo NarHash says"),
        (
            path("bad-sig"),
            "signature by nixpush-test-1 does not verify",
        ),
        (path("untrusted"), "signed only by stranger-1"),
        (top.clone(), &format!("reference {dep} has no narinfo")),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{needle_path}: ")) && l.contains(needle)),
            "no line for {needle_path} with {needle:?} in:\n{out}"
        );
    }
    assert!(
        text(&o.stderr).contains("7 problems found"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn leftovers_misplaced_narinfos_and_cache_info_are_reported() {
    let bed = Bed::new();
    let out = bed
        .nix
        .build(&derivation("leftover", "echo leftover > $out"));
    let dir = bed.dir.path().join("cache");
    let file = format!("file://{}", dir.display());
    bed.push_ok(&file, &[&out[0]]);
    // What a crash in the middle of writing a NAR leaves behind.
    let temp = dir.join("nar/.nixpush-interrupted");
    fs::write(&temp, b"partial").unwrap();
    let (code, report) = verify_json(&bed, &file, &["--all"]);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(
        problems(&report),
        [(
            "nar/.nixpush-interrupted".to_owned(),
            "incomplete_upload".to_owned()
        )]
        .into()
    );
    assert!(temp.exists(), "verify deletes nothing");
    // Paths alone do not look for leftovers.
    assert_clean(&bed, &file, &[&out[0]], 1, "nixpush-test-1");
    fs::remove_file(&temp).unwrap();

    // A narinfo stored under another path's hash.
    let other = "0000000000000000000000000000000a";
    let copied = dir.join(format!("{other}.narinfo"));
    fs::copy(dir.join(format!("{}.narinfo", hash_part(&out[0]))), &copied).unwrap();
    let (code, report) = verify_json(&bed, &file, &["--all"]);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(
        problems(&report),
        [(format!("{other}.narinfo"), "narinfo_wrong_path".to_owned())].into()
    );
    fs::remove_file(&copied).unwrap();

    // nix-cache-info for another store directory, then none at all.
    let info = dir.join("nix-cache-info");
    let text = fs::read_to_string(&info).unwrap();
    fs::write(
        &info,
        text.replace("StoreDir: /nix/store", "StoreDir: /gnu/store"),
    )
    .unwrap();
    let (code, report) = verify_json(&bed, &file, &[&out[0]]);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(
        problems(&report),
        [("nix-cache-info".to_owned(), "store_dir_mismatch".to_owned())].into()
    );
    fs::remove_file(&info).unwrap();
    let (code, report) = verify_json(&bed, &file, &[&out[0]]);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(
        problems(&report),
        [("nix-cache-info".to_owned(), "cache_info_missing".to_owned())].into()
    );
}

on_every_server!(
    an_unfinished_multipart_upload_is_reported_where_the_server_lists_them,
    unfinished_multipart_upload
);
fn unfinished_multipart_upload(kind: S3Kind) {
    let bed = Bed::on(kind);
    let out = bed.nix.build(&derivation("unfinished", "echo u > $out"));
    let url = bed.s3.store_url("");
    bed.push_ok(&url, &[&out[0]]);
    bed.s3.start_multipart_upload("nar/unfinished.nar.zst");
    let o = bed.verify(&url, &["--all"]);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    if kind == S3Kind::S3sFs {
        // s3s-fs does not implement ListMultipartUploads: the audit says so and stands.
        assert_eq!(o.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("note: cannot list incomplete uploads"),
            "{stderr}"
        );
    } else {
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(
            stdout.starts_with("nar/unfinished.nar.zst: ") && stdout.contains("multipart upload"),
            "{stdout}"
        );
    }
}

#[test]
fn what_stops_an_audit_is_a_clear_error_with_exit_2() {
    let bed = Bed::new();
    let out = bed.nix.build(&derivation("audit-errors", "echo e > $out"));
    let url = bed.s3.store_url("");
    bed.push_ok(&url, &[&out[0]]);
    let path = out[0].as_str();

    let fails = |o: Output, expect: &str| {
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{expect}: {err}");
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
    };
    let o = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .args([
            "verify",
            "--store",
            &url,
            "--trusted-public-key",
            &bed.public,
            path,
        ])
        .envs(bed.s3.credentials_env())
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .unwrap();
    fails(o, "access denied to bucket `cache`");
    fails(
        bed.verify(
            "s3://cache?endpoint=http://127.0.0.1:1&region=us-east-1",
            &[path],
        ),
        "cannot reach the S3 endpoint",
    );
    fails(bed.verify("ftp://x", &[path]), "is not supported");
    fails(
        bed.verify(&bed.s3.http_url, &["--all"]),
        "cannot be listed: --all needs an s3:// or file:// cache",
    );
    fails(
        bed.verify("file:///nonexistent/cache", &[path]),
        "/nonexistent/cache",
    );
    fails(
        bed.verify(&url, &["--trusted-public-key", "nokey", path]),
        "\"nokey\" is neither a public key nor a file",
    );
    fails(bed.verify(&url, &["/tmp"]), "/tmp is not in the Nix store");

    // A path that is not in the cache is a finding, not an error.
    let absent = bed.nix.build(&derivation("audit-absent", "echo a > $out"));
    let o = bed.verify(&url, &[&absent[0]]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stdout).trim(),
        format!("{}: not in the cache (no narinfo)", absent[0])
    );
}

on_every_server!(
    all_lists_beyond_one_page_of_the_bucket,
    all_lists_beyond_one_page
);
fn all_lists_beyond_one_page(kind: S3Kind) {
    let bed = Bed::on(kind);
    let out = bed
        .nix
        .build(&derivation("many-objects", "echo many > $out"));
    let url = bed.s3.store_url("");
    bed.push_ok(&url, &[&out[0]]);
    // S3 lists 1,000 keys per page.
    bed.s3.put_all(
        (0..1500)
            .map(|i| (format!("nar/orphan-{i}.nar"), b"x".to_vec()))
            .collect(),
    );
    let (code, report) = verify_json(&bed, &url, &["--all"]);
    assert_eq!(code, Some(1));
    let found = problems(&report);
    assert_eq!(found.len(), 1500, "{report:#}");
    assert!(found.iter().all(|(_, kind)| kind == "orphan_nar"));
    assert_eq!(report["narinfos"], 1);
}

/// Regression: verify of a `file://` cache followed a narinfo's `URL:` wherever it pointed: out of
/// the cache (`../`, `/etc/shadow`), and into `/dev/zero`, where it hung.
#[test]
fn a_narinfo_url_outside_a_file_cache_is_refused_not_followed() {
    let bed = Bed::new();
    let out = bed.nix.build(&derivation("outside", "echo outside > $out"));
    let dir = bed.dir.path().join("cache");
    let file = format!("file://{}", dir.display());
    bed.push_ok(&file, &[&out[0]]);
    let narinfo = dir.join(format!("{}.narinfo", hash_part(&out[0])));
    let info: NarInfo = fs::read_to_string(&narinfo).unwrap().parse().unwrap();
    // The real NAR, outside the cache: following the URL there would verify clean.
    fs::copy(dir.join(&info.url), bed.dir.path().join("outside.nar")).unwrap();
    // And through a symlink inside the cache.
    std::os::unix::fs::symlink(bed.dir.path().join("outside.nar"), dir.join("nar/link.nar"))
        .unwrap();
    for url in [
        "../outside.nar",
        "/dev/zero",
        "nar/../../outside.nar",
        "nar/link.nar",
    ] {
        edit_narinfo(&narinfo, None, |i| i.url = url.to_owned());
        // The URL is not signed, so the narinfo still verifies; only where it points is wrong.
        let o = Command::new("timeout")
            .arg("60")
            .arg(env!("CARGO_BIN_EXE_nixpush"))
            .args([
                "verify",
                "--store",
                &file,
                "--trusted-public-key",
                &bed.public,
            ])
            .arg(&out[0])
            .output()
            .unwrap();
        let stdout = text(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{url}: {stdout}{}",
            text(&o.stderr)
        );
        assert!(
            stdout.contains(&format!("{url:?} points outside the cache directory")),
            "{url}: {stdout}"
        );
    }
}

/// An HTTP server that answers every request with `status` (and `body`), for as long as it lives.
fn answering(status: &'static str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = conn.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    format!("http://{addr}")
}

/// Regression: over HTTP, 401 and 403 were read as "not in the cache", so a cache that refused us
/// verified as empty (exit 1, every path missing) instead of as inaccessible (exit 2).
#[test]
fn a_cache_that_refuses_anonymous_reads_is_an_access_error() {
    let bed = Bed::new();
    for status in ["401 Unauthorized", "403 Forbidden"] {
        let url = answering(status);
        let o = bed.verify(&url, &["/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-x"]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{status}: {err}");
        let code = &status[..3];
        assert!(
            err.contains(&format!("answered HTTP {code}")) && err.contains("anonymous"),
            "{status}: {err}"
        );
    }
}
