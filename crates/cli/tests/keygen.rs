//! `nixpush keygen`, run as a real binary.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Output};

use nixpush_format::{PublicKey, SecretKey};

fn keygen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .arg("keygen")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn writes_a_matching_pair_with_a_private_secret() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("sk"), d.path().join("pk"));
    let o = keygen(&[
        "cache.example.org-1",
        sk.to_str().unwrap(),
        pk.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let secret: SecretKey = fs::read_to_string(&sk).unwrap().parse().unwrap();
    let public: PublicKey = fs::read_to_string(&pk).unwrap().parse().unwrap();
    assert_eq!(secret.public_key(), public);
    assert_eq!(public.name(), "cache.example.org-1");
    // Like Nix: no trailing newline; and the public key is printed for pasting into nix.conf.
    assert!(!fs::read_to_string(&pk).unwrap().ends_with('\n'));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        public.to_string()
    );
    // Nothing left behind but the two files.
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
}

#[test]
fn refuses_to_overwrite_without_force() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("sk"), d.path().join("pk"));
    let (sks, pks) = (sk.to_str().unwrap(), pk.to_str().unwrap());
    assert!(keygen(&["k", sks, pks]).status.success());
    let before = fs::read_to_string(&sk).unwrap();
    let o = keygen(&["k", sks, pks]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("already exists") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read_to_string(&sk).unwrap(), before);
    // With --force the pair is replaced, and the secret is still 0600 even if it had been widened.
    fs::set_permissions(&sk, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(keygen(&["k", sks, pks, "--force"]).status.success());
    assert_ne!(fs::read_to_string(&sk).unwrap(), before);
    assert_eq!(
        fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn bad_names_and_unwritable_places_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("sk"), d.path().join("pk"));
    let (sks, pks) = (sk.to_str().unwrap(), pk.to_str().unwrap());
    for (name, why) in [("", "empty"), ("a:b", "contains `:`")] {
        let o = keygen(&[name, sks, pks]);
        assert_eq!(o.status.code(), Some(2));
        assert!(
            stderr(&o).contains("invalid key name") && stderr(&o).contains(why),
            "{}",
            stderr(&o)
        );
        assert!(!sk.exists() && !pk.exists());
    }
    let missing = d.path().join("no/such/dir/sk");
    let o = keygen(&["k", missing.to_str().unwrap(), pks]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot write secret key file") && stderr(&o).contains("no/such/dir")
    );
    // A public file that cannot be written leaves no orphan secret behind.
    let o = keygen(&["k", sks, d.path().join("nope/pk").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot write public key file"),
        "{}",
        stderr(&o)
    );
    assert!(!sk.exists());
}

#[test]
fn force_never_replaces_something_that_is_not_a_regular_file() {
    // A FIFO stands in for a device node such as /dev/null, which a rename would replace with a
    // regular file when run as root.
    let d = tempfile::tempdir().unwrap();
    let (sk, fifo) = (d.path().join("sk"), d.path().join("fifo"));
    nixpush_testbed::check(
        "mkfifo",
        Command::new("mkfifo").arg(&fifo).output().unwrap(),
    );
    let o = keygen(&["k", sk.to_str().unwrap(), fifo.to_str().unwrap(), "--force"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("fifo") && stderr(&o).contains("not a regular file"),
        "{}",
        stderr(&o)
    );
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(!sk.exists());
}
