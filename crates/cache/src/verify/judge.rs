//! Judging one narinfo: reading its NAR object (hashed as stored, decompressed, parsed as a NAR,
//! all streaming), checking what that showed against the narinfo's fields, and its signatures
//! against the trusted keys.

use std::io::{self, Read};

use nixpush_format::hash::HashCounter;
use nixpush_format::nar::{Limits, read_nar};
use nixpush_format::{Compression, NarInfo, PublicKey, Sha256};

use super::Problem;
use crate::target::Target;

/// What reading one NAR object showed. Shared by every narinfo that points to the object.
#[derive(Debug, Clone)]
pub(super) enum NarScan {
    Missing,
    Unreadable(String),
    Read {
        file_hash: Sha256,
        file_size: u64,
        decoded: Decoded,
    },
}

#[derive(Debug, Clone)]
pub(super) enum Decoded {
    /// Compression nixpush cannot decode: only the object's own bytes were checked.
    Skipped,
    Decompression(String),
    Malformed(String),
    Nar {
        hash: Sha256,
        size: u64,
        trailing: u64,
    },
}

/// A reader that hashes and counts what passes, and remembers the first error from below (so a
/// failed download is told apart from a bad NAR).
struct Tap<R> {
    inner: R,
    hash: HashCounter,
    error: Option<String>,
}

impl<R: Read> Tap<R> {
    fn new(inner: R) -> Self {
        Tap {
            inner,
            hash: HashCounter::default(),
            error: None,
        }
    }
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hash.update(&buf[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.error.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
    }
}

/// Reads a whole NAR object: hash and size as stored, then decompressed, validated and hashed.
/// Runs on a blocking thread.
fn scan<R: Read>(reader: R, compression: Option<Compression>) -> NarScan {
    let mut raw = Tap::new(reader);
    let decoded = match compression {
        Some(c) => decode(&mut raw, c),
        None => Decoded::Skipped,
    };
    // Read to the end even after a decoding error: FileSize and FileHash still say whether the
    // object is the one the narinfo describes, which names the fault better.
    let _ = io::copy(&mut raw, &mut io::sink());
    if let Some(e) = raw.error {
        return NarScan::Unreadable(e);
    }
    let (file_hash, file_size) = raw.hash.finish();
    NarScan::Read {
        file_hash,
        file_size,
        decoded,
    }
}

fn decode<R: Read>(raw: &mut R, compression: Compression) -> Decoded {
    let decoder: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(raw),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(raw)),
        Compression::Zstd => match zstd::stream::read::Decoder::new(raw) {
            Ok(d) => Box::new(d),
            Err(e) => return Decoded::Decompression(e.to_string()),
        },
    };
    let mut nar = Tap::new(decoder);
    if let Err(e) = read_nar(&mut nar, &mut (), &Limits::default()) {
        // An error from below the NAR reader is the decompressor's (or the download's, which the
        // caller sees first); anything else is the NAR's own structure.
        return match nar.error.take() {
            Some(below) if compression != Compression::None => Decoded::Decompression(below),
            _ => Decoded::Malformed(e.to_string()),
        };
    }
    let before = nar.hash.clone().finish().1;
    if let Err(e) = io::copy(&mut nar, &mut io::sink()) {
        return Decoded::Decompression(e.to_string());
    }
    let (hash, size) = nar.hash.finish();
    Decoded::Nar {
        hash,
        size,
        trailing: size - before,
    }
}

pub(super) async fn read_object(
    target: &Target,
    url: &str,
    compression: Option<Compression>,
) -> NarScan {
    match target.read(url).await {
        Ok(None) => NarScan::Missing,
        Err(e) => NarScan::Unreadable(e.to_string()),
        Ok(Some(reader)) => tokio::task::spawn_blocking(move || scan(reader, compression))
            .await
            .expect("NAR scan panicked"),
    }
}

/// Which trusted key vouches for the narinfo, and what is wrong with its signatures if none does.
pub(super) fn signatures(info: &NarInfo, trusted: &[PublicKey]) -> (Option<String>, Vec<Problem>) {
    let fingerprint = match info.fingerprint() {
        Ok(f) => f,
        Err(e) => {
            return (
                None,
                vec![Problem::NarInfoInvalid {
                    message: e.to_string(),
                }],
            );
        }
    };
    if let Some(k) = trusted
        .iter()
        .find(|k| info.sigs.iter().any(|s| k.verify(&fingerprint, s)))
    {
        return (Some(k.name().to_owned()), Vec::new());
    }
    if info.sigs.is_empty() {
        return (None, vec![Problem::Unsigned]);
    }
    let bad: Vec<Problem> = info
        .sigs
        .iter()
        .filter(|s| trusted.iter().any(|k| k.name() == s.key_name()))
        .map(|s| Problem::BadSignature {
            key: s.key_name().to_owned(),
        })
        .collect();
    if !bad.is_empty() {
        return (None, bad);
    }
    let keys = info.sigs.iter().map(|s| s.key_name().to_owned()).collect();
    (None, vec![Problem::UntrustedSignatures { keys }])
}

/// Compares what the NAR object turned out to be with what the narinfo says. The first mismatch
/// along the pipeline is the one reported: the later ones follow from it.
pub(super) fn judge(
    info: &NarInfo,
    scan: &NarScan,
    compression: Option<Compression>,
) -> Vec<Problem> {
    let url = info.url.clone();
    let (file_hash, file_size, decoded) = match scan {
        NarScan::Missing => return vec![Problem::NarMissing { url }],
        NarScan::Unreadable(message) => {
            return vec![Problem::Unreadable {
                key: url,
                message: message.clone(),
            }];
        }
        NarScan::Read {
            file_hash,
            file_size,
            decoded,
        } => (*file_hash, *file_size, decoded),
    };
    if let Some(expected) = info.file_size
        && expected != file_size
    {
        return vec![Problem::FileSizeMismatch {
            url,
            actual: file_size,
            expected,
        }];
    }
    if let Some(expected) = info.file_hash
        && expected != file_hash
    {
        return vec![Problem::FileHashMismatch {
            url,
            actual: file_hash,
            expected,
        }];
    }
    match decoded {
        Decoded::Skipped => Vec::new(),
        Decoded::Decompression(message) => vec![Problem::Decompression {
            url,
            compression: compression.unwrap_or(Compression::None),
            message: message.clone(),
        }],
        Decoded::Malformed(message) => vec![Problem::NarMalformed {
            url,
            message: message.clone(),
        }],
        Decoded::Nar {
            hash,
            size,
            trailing,
        } => {
            if *trailing > 0 {
                vec![Problem::TrailingData {
                    url,
                    bytes: *trailing,
                }]
            } else if *size != info.nar_size {
                vec![Problem::NarSizeMismatch {
                    actual: *size,
                    expected: info.nar_size,
                }]
            } else if *hash != info.nar_hash {
                vec![Problem::NarHashMismatch {
                    actual: *hash,
                    expected: info.nar_hash,
                }]
            } else {
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use nixpush_format::SecretKey;
    use nixpush_format::nar::{Node, write_node};
    use proptest::prelude::*;

    use super::*;

    fn nar() -> Vec<u8> {
        let tree = Node::Directory(BTreeMap::from([
            (
                b"bin".to_vec(),
                Node::Regular {
                    executable: true,
                    contents: b"#!/bin/sh\necho hi\n".repeat(500),
                },
            ),
            (
                b"link".to_vec(),
                Node::Symlink {
                    target: b"bin".to_vec(),
                },
            ),
        ]));
        let mut out = Vec::new();
        write_node(&tree, &mut out).unwrap();
        out
    }

    fn compress(data: &[u8], c: Compression) -> Vec<u8> {
        match c {
            Compression::None => data.to_vec(),
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    /// A narinfo that describes `nar` stored as `file`.
    fn info_for(nar: &[u8], file: &[u8], c: Compression) -> NarInfo {
        NarInfo {
            store_path: "/nix/store/7h8yvyalwgmvfbkjn2gnd8ackbcqfp2d-x"
                .parse()
                .unwrap(),
            url: format!("nar/x.nar{}", c.extension()),
            compression: c.as_str().to_owned(),
            file_hash: Some(Sha256::digest(file)),
            file_size: Some(file.len() as u64),
            nar_hash: Sha256::digest(nar),
            nar_size: nar.len() as u64,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        }
    }

    fn judge_bytes(info: &NarInfo, stored: &[u8], c: Compression) -> Vec<Problem> {
        judge(info, &scan(stored, Some(c)), Some(c))
    }

    const ALL: [Compression; 3] = [Compression::None, Compression::Xz, Compression::Zstd];

    #[test]
    fn intact_nars_pass_in_every_compression() {
        let nar = nar();
        for c in ALL {
            let file = compress(&nar, c);
            assert_eq!(
                judge_bytes(&info_for(&nar, &file, c), &file, c),
                vec![],
                "{c:?}"
            );
        }
    }

    #[test]
    fn each_fault_is_named_by_its_first_symptom() {
        let nar = nar();
        for c in ALL {
            let file = compress(&nar, c);
            let info = info_for(&nar, &file, c);
            let kinds = |stored: &[u8], info: &NarInfo| -> Vec<&'static str> {
                judge_bytes(info, stored, c)
                    .iter()
                    .map(Problem::kind)
                    .collect()
            };
            assert_eq!(
                kinds(&file[..file.len() - 7], &info),
                ["file_size_mismatch"]
            );
            let mut flipped = file.clone();
            flipped[file.len() / 2] ^= 0x40;
            assert_eq!(kinds(&flipped, &info), ["file_hash_mismatch"]);

            // Without FileHash/FileSize (allowed by the format) the decoder or the NAR reader
            // catches what the hashes would have.
            let mut bare = info.clone();
            bare.file_hash = None;
            bare.file_size = None;
            let truncated = kinds(&file[..file.len() - 7], &bare);
            let expected = if c == Compression::None {
                "nar_malformed"
            } else {
                "decompression_failed"
            };
            assert_eq!(truncated, [expected], "{c:?}");

            let mut wrong = info.clone();
            wrong.nar_hash = Sha256::digest(b"other");
            assert_eq!(kinds(&file, &wrong), ["nar_hash_mismatch"]);
            wrong = info.clone();
            wrong.nar_size += 1;
            assert_eq!(kinds(&file, &wrong), ["nar_size_mismatch"]);
        }
    }

    #[test]
    fn data_after_the_nar_and_non_nars_are_named() {
        let nar = nar();
        let mut longer = nar.clone();
        longer.extend_from_slice(b"trailing");
        let info = info_for(&nar, &longer, Compression::None);
        let p = judge_bytes(&info, &longer, Compression::None);
        assert!(
            matches!(p.as_slice(), [Problem::TrailingData { bytes: 8, .. }]),
            "{p:?}"
        );
        let junk = b"definitely not a NAR".repeat(10);
        let info = info_for(&junk, &junk, Compression::None);
        let p = judge_bytes(&info, &junk, Compression::None);
        assert!(
            matches!(&p[..], [Problem::NarMalformed { message, .. }] if message.contains("not a NAR")),
            "{p:?}"
        );
    }

    /// Fails after `ok` bytes, as a dropped download does.
    struct Broken<'a> {
        data: &'a [u8],
        ok: usize,
    }

    impl Read for Broken<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::other("connection reset"));
            }
            let n = buf.len().min(self.ok).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_failed_download_is_unreadable_not_corrupt() {
        let nar = nar();
        for c in ALL {
            let file = compress(&nar, c);
            let scanned = scan(
                Broken {
                    data: &file,
                    ok: file.len() / 2,
                },
                Some(c),
            );
            let p = judge(&info_for(&nar, &file, c), &scanned, Some(c));
            assert!(
                matches!(&p[..], [Problem::Unreadable { message, .. }] if message.contains("connection reset")),
                "{c:?}: {p:?}"
            );
            assert!(!p[0].is_defect());
        }
    }

    #[test]
    fn signatures_name_the_trusted_key_or_what_is_wrong() {
        let ours = SecretKey::generate("ours-1").unwrap();
        let theirs = SecretKey::generate("theirs-1").unwrap();
        let trusted = vec![ours.public_key()];
        let nar = nar();
        let mut info = info_for(&nar, &nar, Compression::None);
        assert_eq!(signatures(&info, &trusted), (None, vec![Problem::Unsigned]));
        info.sign(&theirs).unwrap();
        assert_eq!(
            signatures(&info, &trusted),
            (
                None,
                vec![Problem::UntrustedSignatures {
                    keys: vec!["theirs-1".into()]
                }]
            )
        );
        info.sign(&ours).unwrap();
        assert_eq!(signatures(&info, &trusted), (Some("ours-1".into()), vec![]));
        // Signed for other contents: the signature no longer matches.
        info.nar_size += 1;
        assert_eq!(
            signatures(&info, &trusted),
            (
                None,
                vec![Problem::BadSignature {
                    key: "ours-1".into()
                }]
            )
        );
    }

    proptest! {
        #[test]
        fn arbitrary_objects_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let nar = nar();
            for c in ALL {
                let p = judge(&info_for(&nar, &nar, c), &scan(&data[..], Some(c)), Some(c));
                prop_assert!(!p.is_empty());
            }
        }
    }
}
