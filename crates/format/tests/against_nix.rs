//! The format crate checked against real Nix 2.8 (through a private nix-daemon): NAR bytes and
//! hashes, fingerprints and signatures, key files in both directions.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use nixpush_format::nar::{self, Limits};
use nixpush_format::{NarInfo, PublicKey, SecretKey, Sha256, StorePath};
use nixpush_testbed::{NixDaemon, check, derivation, find_program};

fn dump(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    nar::dump_path(path, &mut v).unwrap();
    v
}

/// Checks one tree: added with `nix-store --add`, our NAR of the original equals Nix's NAR of the
/// store copy, our hash equals `nix-store --query --hash`, and our reader accepts Nix's bytes.
fn assert_same_as_nix(nix: &NixDaemon, tree: &Path) {
    let store_path = nix.add(tree);
    let ours = dump(tree);
    let out = nix
        .cmd("nix-store")
        .args(["--dump", &store_path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = out.stdout;
    assert_eq!(ours.len(), theirs.len(), "NAR size of {}", tree.display());
    assert!(
        ours == theirs,
        "NAR bytes of {} differ from nix-store --dump",
        tree.display()
    );
    let nix_hash = nix.run("nix-store", &["--query", "--hash", &store_path]);
    let nix_hash: Sha256 = nix_hash.trim().parse().unwrap();
    assert_eq!(Sha256::digest(&ours), nix_hash);
    assert_eq!(
        nar::read_nar(&mut &theirs[..], &mut (), &Limits::default()).unwrap(),
        theirs.len() as u64
    );
    // Dumping the store copy itself (canonicalised permissions and times) gives the same bytes.
    assert!(dump(Path::new(&store_path)) == theirs);
}

#[test]
fn nar_corpus_matches_nix_store_dump() {
    let nix = NixDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join(nixpush_testbed::unique("corpus"));
    fs::create_dir(&t).unwrap();
    fs::write(t.join("empty"), b"").unwrap();
    for n in [1usize, 7, 8, 9, 15, 16, 17, 1023, 4096, 65_537] {
        fs::write(t.join(format!("size-{n}")), vec![b'x'; n]).unwrap();
    }
    fs::write(t.join("run"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(t.join("run"), fs::Permissions::from_mode(0o755)).unwrap();
    // Only the owner-execute bit counts; group/other execute alone is not "executable".
    fs::write(t.join("group-exec"), b"x").unwrap();
    fs::set_permissions(t.join("group-exec"), fs::Permissions::from_mode(0o654)).unwrap();
    symlink("size-7", t.join("rel-link")).unwrap();
    symlink("/etc/hostname", t.join("abs-link")).unwrap();
    symlink("does/not/exist", t.join("dangling")).unwrap();
    symlink("../up", t.join("dotdot-link")).unwrap();
    fs::create_dir(t.join("empty-dir")).unwrap();
    // Byte order differs from any locale's: upper case first, `-`/`_`/space, UTF-8 last.
    for name in [
        "A",
        "a",
        "B",
        "b",
        "Zebra",
        "apple",
        "_under",
        "-dash",
        "with space",
        "ünï",
        "日本",
        "Äpfel",
        "z",
        "1",
        "10",
        "9",
        "a.b",
        "a-b",
        "a_b",
    ] {
        fs::write(t.join(name), name.as_bytes()).unwrap();
    }
    let mut deep = t.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("d{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"40 levels down").unwrap();
    assert_same_as_nix(&nix, &t);

    // Single files and symlinks as the whole store path, not inside a directory.
    let f = tmp.path().join(nixpush_testbed::unique("single-file"));
    fs::write(&f, b"foo\n").unwrap();
    assert_same_as_nix(&nix, &f);
    let e = tmp.path().join(nixpush_testbed::unique("single-exec"));
    fs::write(&e, b"").unwrap();
    fs::set_permissions(&e, fs::Permissions::from_mode(0o700)).unwrap();
    assert_same_as_nix(&nix, &e);
}

#[test]
fn nar_of_a_100_mib_file_matches_nix() {
    let nix = NixDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join(nixpush_testbed::unique("big"));
    fs::create_dir(&t).unwrap();
    // Incompressible-looking, not a multiple of 8, and different on every run.
    let mut state = std::process::id() as u64 | 1;
    let mut data = vec![0u8; 100 * 1024 * 1024 + 3];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    fs::write(t.join("blob"), &data).unwrap();
    drop(data);
    assert_same_as_nix(&nix, &t);
}

/// Copies `path` to a `file://` cache with Nix itself and returns its narinfo file and contents.
fn narinfo_via_nix_copy(nix: &NixDaemon, path: &str, cache: &Path) -> (String, NarInfo) {
    let url = format!("file://{}", cache.display());
    nix.run("nix", &["copy", "--to", &url, path]);
    let hash = path.parse::<StorePath>().unwrap().hash_part().to_owned();
    let file = cache.join(format!("{hash}.narinfo"));
    let text = fs::read_to_string(&file).unwrap();
    (file.to_string_lossy().into_owned(), text.parse().unwrap())
}

fn nix_verify(nix: &NixDaemon, store: &str, trusted: &str, path: &str) -> bool {
    nix.cmd("nix")
        .args(["store", "verify", "--no-contents", "--sigs-needed", "1"])
        .args(["--option", "trusted-public-keys", trusted])
        .args(["--store", store, path])
        .status()
        .unwrap()
        .success()
}

#[test]
fn nixpush_keys_and_signatures_interoperate_with_nix() {
    let nix = NixDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let out = nix.build(&derivation("sign-me", "echo signed > $out"));
    let path = out[0].as_str();

    // Our secret key signs in Nix (`nix store sign`), and our public key verifies the result in Nix.
    let sk = SecretKey::generate("nixpush-test-1").unwrap();
    let sk_file = tmp.path().join("sk");
    fs::write(&sk_file, sk.to_secret_file_contents()).unwrap();
    let pk = sk.public_key().to_string();
    let daemon = nix.store_url();
    assert!(
        !nix_verify(&nix, &daemon, &pk, path),
        "unsigned path must not verify"
    );
    nix.run(
        "nix",
        &[
            "store",
            "sign",
            "--key-file",
            sk_file.to_str().unwrap(),
            path,
        ],
    );
    assert!(nix_verify(&nix, &daemon, &pk, path));

    // A fingerprint we compute and sign for a real path verifies in Nix.
    let cache = tmp.path().join("cache");
    let (file, mut info) = narinfo_via_nix_copy(&nix, path, &cache);
    let store = format!("file://{}", cache.display());
    let ours = SecretKey::generate("nixpush-test-2").unwrap();
    info.sigs.clear();
    info.sign(&ours).unwrap();
    fs::write(&file, info.to_string()).unwrap();
    let ours_pk = ours.public_key().to_string();
    assert!(nix_verify(&nix, &store, &ours_pk, path));
    // ... and only that key's signature counts: another key name does not verify it.
    assert!(!nix_verify(&nix, &store, &pk, path));
    // A changed NarSize breaks the signature for Nix too.
    let tampered = info.to_string().replace(
        &format!("NarSize: {}", info.nar_size),
        &format!("NarSize: {}", info.nar_size + 8),
    );
    fs::write(&file, tampered).unwrap();
    assert!(!nix_verify(&nix, &store, &ours_pk, path));
}

#[test]
fn keys_made_by_nix_load_in_nixpush() {
    let tmp = tempfile::tempdir().unwrap();
    let (sk_file, pk_file) = (tmp.path().join("sk"), tmp.path().join("pk"));
    let out = Command::new(find_program("nix-store"))
        .args(["--generate-binary-cache-key", "made-by-nix-1"])
        .args([&sk_file, &pk_file])
        .output()
        .unwrap();
    check("nix-store --generate-binary-cache-key", out);
    let sk: SecretKey = fs::read_to_string(&sk_file).unwrap().parse().unwrap();
    let pk: PublicKey = fs::read_to_string(&pk_file).unwrap().parse().unwrap();
    assert_eq!(sk.name(), "made-by-nix-1");
    assert_eq!(sk.public_key(), pk);
    // Nix writes both without a newline; our writer must produce the same bytes for the same key.
    assert_eq!(
        sk.to_secret_file_contents(),
        fs::read_to_string(&sk_file).unwrap()
    );
    assert_eq!(pk.to_string(), fs::read_to_string(&pk_file).unwrap());
    let sig = sk.sign("1;/nix/store/x;sha256:0;1;");
    assert!(pk.verify("1;/nix/store/x;sha256:0;1;", &sig));
}
