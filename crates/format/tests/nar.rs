//! The NAR reader accepts everything the writer produces, and rejects each malformed case with an
//! error (never a panic). Byte-for-byte agreement with `nix-store --dump` is tested against real Nix
//! in the CLI crate's integration tests.

use std::collections::BTreeMap;

use nixpush_format::nar::{Limits, NarError, Node, TreeBuilder, copy_nar, read_nar, write_node};
use proptest::prelude::*;

fn nar_of(node: &Node) -> Vec<u8> {
    let mut v = Vec::new();
    write_node(node, &mut v).unwrap();
    v
}

fn read_tree(bytes: &[u8]) -> Result<Node, NarError> {
    let mut tb = TreeBuilder::default();
    read_nar(&mut &bytes[..], &mut tb, &Limits::default())?;
    Ok(tb.into_tree().unwrap())
}

/// Encodes tokens as NAR strings, to build malformed archives the writer cannot produce.
fn raw(tokens: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for t in tokens {
        v.extend_from_slice(&(t.len() as u64).to_le_bytes());
        v.extend_from_slice(t);
        v.resize(v.len().next_multiple_of(8), 0);
    }
    v
}

fn file(contents: &[u8]) -> Node {
    Node::Regular {
        executable: false,
        contents: contents.to_vec(),
    }
}

fn dir(entries: &[(&str, Node)]) -> Node {
    Node::Directory(
        entries
            .iter()
            .map(|(n, c)| (n.as_bytes().to_vec(), c.clone()))
            .collect(),
    )
}

#[test]
fn foo_vector_from_the_reference() {
    let nar = nar_of(&file(b"foo\n"));
    assert_eq!(nar.len(), 120);
    let h = nixpush_format::Sha256::digest(&nar);
    assert_eq!(
        h.to_string(),
        "sha256:1476r2f1nccfi3d6l0yxj5m4xww6irm6x3mhz3ifpzi5nlql1ys2"
    );
}

#[test]
fn copy_stops_exactly_at_the_end() {
    let nar = nar_of(&dir(&[
        ("a", file(b"x")),
        (
            "b",
            Node::Symlink {
                target: b"a".to_vec(),
            },
        ),
    ]));
    let mut stream = nar.clone();
    stream.extend_from_slice(b"TRAILING PROTOCOL BYTES");
    let mut src = &stream[..];
    let mut out = Vec::new();
    assert_eq!(copy_nar(&mut src, &mut out).unwrap(), nar.len() as u64);
    assert_eq!(out, nar);
    assert_eq!(src, b"TRAILING PROTOCOL BYTES");
}

fn expect_err(bytes: &[u8], pred: impl Fn(&NarError) -> bool, what: &str) {
    match read_tree(bytes) {
        Err(e) => assert!(pred(&e), "{what}: wrong error {e}"),
        Ok(t) => panic!("{what}: accepted {t:?}"),
    }
}

#[test]
fn rejects_each_malformed_case() {
    let h: &[u8] = b"nix-archive-1";
    let entry = |name: &'static [u8]| -> Vec<&'static [u8]> {
        vec![
            b"entry",
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"",
            b")",
            b")",
        ]
    };
    let with_entries = |names: &[&'static [u8]]| {
        let mut t: Vec<&[u8]> = vec![h, b"(", b"type", b"directory"];
        for n in names {
            t.extend(entry(n));
        }
        t.push(b")");
        raw(&t)
    };
    use NarError::*;
    expect_err(
        &raw(&[b"nix-archive-2"]),
        |e| matches!(e, NotANar),
        "bad magic",
    );
    expect_err(b"", |e| matches!(e, Truncated { .. }), "empty input");
    expect_err(
        &with_entries(&[b"b", b"a"]),
        |e| matches!(e, NotSorted { .. }),
        "unsorted",
    );
    expect_err(
        &with_entries(&[b"a", b"a"]),
        |e| matches!(e, NotSorted { .. }),
        "duplicate",
    );
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        expect_err(
            &with_entries(&[bad]),
            |e| matches!(e, BadName { .. }),
            "bad name",
        );
    }
    let long_name: &'static [u8] = Box::leak(vec![b'n'; 256].into_boxed_slice());
    expect_err(
        &with_entries(&[long_name]),
        |e| matches!(e, TooLong { .. }),
        "long name",
    );
    assert!(read_tree(&with_entries(&[&long_name[..255]])).is_ok());
    let link = |t: &'static [u8]| raw(&[h, b"(", b"type", b"symlink", b"target", t, b")"]);
    expect_err(
        &link(b""),
        |e| matches!(e, BadTarget { .. }),
        "empty target",
    );
    expect_err(
        &link(b"a\0b"),
        |e| matches!(e, BadTarget { .. }),
        "NUL target",
    );
    expect_err(
        &raw(&[h, b"(", b"type", b"fifo", b")"]),
        |e| matches!(e, Unexpected { .. }),
        "type",
    );
    expect_err(
        &raw(&[h, b"(", b"type", b"regular", b"data", b"", b")"]),
        |e| matches!(e, Unexpected { .. }),
        "no contents",
    );
    expect_err(
        &raw(&[
            h,
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"x",
            b"contents",
            b"",
            b")",
        ]),
        |e| matches!(e, Unexpected { .. }),
        "executable marker with a value",
    );
    expect_err(
        &raw(&[h, b"(", b"type", &[b'x'; 33]]),
        |e| matches!(e, TooLong { .. }),
        "long tag",
    );
    let mut padded = nar_of(&file(b"abc"));
    let last_pad = padded.len() - 16 - 1; // the last padding byte of "abc", before the `)` token
    padded[last_pad] = 1;
    expect_err(&padded, |e| matches!(e, Padding { .. }), "non-zero padding");
    let mut deep = file(b"");
    for _ in 0..64 {
        deep = dir(&[("d", deep)]);
    }
    expect_err(&nar_of(&deep), |e| matches!(e, TooDeep { .. }), "64 levels");
    let Node::Directory(inner) = deep else {
        unreachable!()
    };
    assert!(
        read_tree(&nar_of(&inner[&b"d".to_vec()])).is_ok(),
        "63 levels are fine"
    );
    let mut trailing = nar_of(&file(b""));
    trailing.truncate(trailing.len() - 8);
    expect_err(&trailing, |e| matches!(e, Truncated { .. }), "missing `)`");
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
        1..12,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn arb_node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(
            |(executable, contents)| Node::Regular {
                executable,
                contents
            }
        ),
        proptest::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 1..30)
            .prop_map(|target| Node::Symlink { target }),
    ];
    leaf.prop_recursive(5, 40, 6, |inner| {
        proptest::collection::btree_map(arb_name(), inner, 0..6)
            .prop_map(|m: BTreeMap<Vec<u8>, Node>| Node::Directory(m))
    })
}

proptest! {
    #[test]
    fn reader_accepts_what_the_writer_writes(node in arb_node()) {
        let nar = nar_of(&node);
        prop_assert_eq!(nar.len() % 8, 0);
        prop_assert_eq!(read_tree(&nar).unwrap(), node);
    }

    #[test]
    fn every_truncation_is_an_error(node in arb_node()) {
        let nar = nar_of(&node);
        for cut in (0..nar.len()).step_by(8) {
            prop_assert!(read_tree(&nar[..cut]).is_err());
        }
    }

    #[test]
    fn mutations_never_panic(node in arb_node(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut nar = nar_of(&node);
        for (i, b) in flips {
            let i = i.index(nar.len());
            nar[i] = b;
        }
        let _ = read_tree(&nar);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_tree(&bytes);
        let mut with_header = raw(&[b"nix-archive-1"]);
        with_header.extend_from_slice(&bytes);
        let _ = read_tree(&with_header);
    }
}
