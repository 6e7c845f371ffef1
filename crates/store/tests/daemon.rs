//! The worker-protocol client against Nix 2.8's own nix-daemon (protocol 1.34).

use std::collections::BTreeSet;

use nixpush_format::{Sha256, StorePath};
use nixpush_store::{Connection, Store, StoreAddress, StoreError};
use nixpush_testbed::{NixDaemon, chain_and_diamond, derivation};

fn lines(s: &str) -> BTreeSet<String> {
    s.lines().map(str::to_owned).collect()
}

#[test]
fn path_info_closure_and_nar_agree_with_nix() {
    let nix = NixDaemon::start();
    let roots = nix.build(&chain_and_diamond());
    let store = Store::open(StoreAddress::Socket(nix.socket.clone())).unwrap();
    let conn_version = store.with_connection(|c| Ok(c.version())).unwrap();
    assert_eq!(conn_version, (1 << 8) | 34, "Nix 2.8 speaks 1.34");

    let root: StorePath = roots[0].parse().unwrap();
    let info = store.path_info(&root).unwrap();
    let nix_hash: Sha256 = nix
        .run("nix-store", &["--query", "--hash", &roots[0]])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(info.nar_hash, nix_hash);
    let size: u64 = nix
        .run("nix-store", &["--query", "--size", &roots[0]])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(info.nar_size, size);
    let refs: BTreeSet<String> = info.references.iter().map(ToString::to_string).collect();
    assert_eq!(
        refs,
        lines(&nix.run("nix-store", &["--query", "--references", &roots[0]]))
    );
    let deriver = nix.run("nix-store", &["--query", "--deriver", &roots[0]]);
    assert_eq!(info.deriver.unwrap().to_string(), deriver.trim());

    let mut nar = Vec::new();
    let n = store.nar(&root, &mut nar).unwrap();
    assert_eq!(n, size);
    let dumped = nix
        .cmd("nix-store")
        .args(["--dump", &roots[0]])
        .output()
        .unwrap()
        .stdout;
    assert!(nar == dumped, "NarFromPath differs from nix-store --dump");
    // The connection is reusable after a NAR stream: the NAR's end was found exactly.
    assert_eq!(store.path_info(&root).unwrap().nar_size, size);

    let roots_sp: Vec<StorePath> = roots.iter().map(|r| r.parse().unwrap()).collect();
    let closure = store.closure(&roots_sp, 4, |_| false).unwrap();
    let ours: BTreeSet<String> = closure.keys().map(ToString::to_string).collect();
    let mut theirs = BTreeSet::new();
    for r in &roots {
        theirs.extend(lines(
            &nix.run("nix-store", &["--query", "--requisites", r]),
        ));
    }
    assert_eq!(ours, theirs);
    assert_eq!(ours.len(), 7, "chain of 3 and diamond of 4");
    // Stopped at every reference (all known to be in a cache, say): only the roots are queried.
    let stopped = store
        .closure(&roots_sp, 4, |p| !roots_sp.contains(p))
        .unwrap();
    assert_eq!(
        stopped.keys().cloned().collect::<BTreeSet<_>>(),
        roots_sp.iter().cloned().collect()
    );
    // A path the store does not have ends the walk with an error naming it, and the others stop.
    // It sorts last, so it is queried after the roots, while helpers walk beside the first.
    let missing: StorePath = "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-not-here"
        .parse()
        .unwrap();
    let mut with_missing = roots_sp.clone();
    with_missing.push(missing.clone());
    match store.closure(&with_missing, 4, |_| false) {
        Err(StoreError::NotValid(p)) => assert_eq!(p, missing),
        other => panic!("expected NotValid for the missing root, got {other:?}"),
    }
}

#[test]
fn derivation_outputs_and_invalid_paths() {
    let nix = NixDaemon::start();
    let out = nix.build(&derivation("outputs", "echo x > $out"))[0].clone();
    let drv = nix.run("nix-store", &["--query", "--deriver", &out]);
    let store = Store::open(StoreAddress::Socket(nix.socket.clone())).unwrap();
    let drv: StorePath = drv.trim().parse().unwrap();
    let outs = store.derivation_outputs(&drv).unwrap();
    assert_eq!(
        outs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec![out.clone()]
    );

    // Deleted: not valid, a clear error; the connection stays usable.
    nix.delete(&out);
    let gone: StorePath = out.parse().unwrap();
    let err = store.path_info(&gone).unwrap_err();
    assert!(matches!(err, StoreError::NotValid(_)), "{err}");
    assert!(err.to_string().contains(&out) && err.to_string().contains("garbage-collected"));
    let err = store.derivation_outputs(&drv).unwrap_err();
    assert!(matches!(err, StoreError::OutputNotBuilt { .. }), "{err}");
    assert!(
        store
            .with_connection(|c| c.query_valid_paths(std::slice::from_ref(&drv)))
            .unwrap()
            == vec![drv.clone()]
    );
}

#[test]
fn stdio_daemon_and_bad_sockets() {
    let nix = NixDaemon::start();
    let out = nix.build(&derivation("stdio", "echo y > $out"))[0].clone();
    // As root with no daemon socket, `nix-daemon --stdio` serves the local store itself.
    let mut c = Connection::open(&StoreAddress::Stdio).unwrap();
    let info = c.query_path_info(&out.parse().unwrap()).unwrap().unwrap();
    assert!(info.nar_size > 0);

    let missing = nix.dir.path().join("no-such-socket");
    let err = Store::open(StoreAddress::Socket(missing.clone()))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn store_urls_resolve_like_nix() {
    assert_eq!(
        StoreAddress::resolve(Some("unix:///run/x.sock")).unwrap(),
        StoreAddress::Socket("/run/x.sock".into())
    );
    assert_eq!(
        StoreAddress::resolve(Some("local")).unwrap(),
        StoreAddress::Stdio
    );
    let err = StoreAddress::resolve(Some("ssh://host")).unwrap_err();
    assert!(err.to_string().contains("ssh://host"));
}

/// Regression: `local?root=/mnt` silently dropped its parameter and read the host's store.
#[test]
fn store_choosing_parameters_are_refused_not_dropped() {
    for (url, named) in [
        ("local?root=/mnt", "root=/mnt"),
        ("daemon?max-connections=4&store=/other", "store=/other"),
        ("unix:///run/x.sock?state=/s&log=/l", "state=/s&log=/l"),
    ] {
        let err = StoreAddress::resolve(Some(url)).unwrap_err().to_string();
        assert!(err.contains(url) && err.contains(named), "{err}");
    }
    // Parameters that only tune the client change nothing for nixpush.
    assert_eq!(
        StoreAddress::resolve(Some("unix:///run/x.sock?max-connections=4")).unwrap(),
        StoreAddress::Socket("/run/x.sock".into())
    );
}
