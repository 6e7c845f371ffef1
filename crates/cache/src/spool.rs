//! NAR → SHA-256 (narHash) → compressor → SHA-256 (FileHash) → spool file, in one streaming pass.
//!
//! The compressed NAR is spooled because its object key is its own hash, known only at the end.
//! Spooling also means nothing is uploaded before the NAR is verified against the store's record: a
//! corrupt path costs local disk, never a bucket object. Small NARs (most of any closure) stay in
//! memory; past [`MEMORY_SPOOL`] bytes the spool moves to a file, so memory stays bounded whatever
//! the NAR's size.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use nixpush_format::hash::HashingWriter;
use nixpush_format::{Compression, PathInfo, Sha256};
use tempfile::NamedTempFile;

use crate::source::NarSource;
use crate::{CacheError, error_chain};

#[derive(Debug, Clone, Copy)]
pub struct CompressOptions {
    pub compression: Compression,
    pub level: Option<i32>,
    /// Threads for the compressor on large NARs; 0 or 1 compresses on the calling thread.
    pub threads: u32,
}

/// Below this NAR size, starting compressor threads costs more than it saves.
pub const PARALLEL_MIN_NAR: u64 = 8 << 20;

/// Compressed bytes kept in memory before the spool moves to a file.
pub const MEMORY_SPOOL: usize = 1 << 20;

/// Where a compressed NAR waits for upload.
pub enum Spool {
    Memory(Vec<u8>),
    File(NamedTempFile),
}

/// Writes to memory until [`MEMORY_SPOOL`] bytes, then moves everything to a file in `dir`.
struct SpoolWriter<'a> {
    dir: &'a Path,
    memory: Vec<u8>,
    file: Option<(NamedTempFile, BufWriter<File>)>,
}

impl Write for SpoolWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.is_none() && self.memory.len() + buf.len() > MEMORY_SPOOL {
            let tmp = tempfile::Builder::new()
                .prefix("nixpush-nar-")
                .tempfile_in(self.dir)?;
            let mut w = BufWriter::with_capacity(1 << 20, tmp.reopen()?);
            w.write_all(&self.memory)?;
            self.memory = Vec::new();
            self.file = Some((tmp, w));
        }
        match &mut self.file {
            Some((_, w)) => w.write(buf),
            None => {
                self.memory.extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some((_, w)) => w.flush(),
            None => Ok(()),
        }
    }
}

impl SpoolWriter<'_> {
    fn finish(self) -> io::Result<Spool> {
        Ok(match self.file {
            // Flushed, not fsynced: the spool is scratch, and a crash means starting this path again.
            Some((tmp, w)) => {
                w.into_inner().map_err(|e| e.into_error())?;
                Spool::File(tmp)
            }
            None => Spool::Memory(self.memory),
        })
    }
}

/// A verified, compressed NAR waiting for upload.
pub struct SpooledNar {
    pub spool: Spool,
    pub compression: Compression,
    pub file_hash: Sha256,
    pub file_size: u64,
    pub nar_hash: Sha256,
    pub nar_size: u64,
}

type ZstdContext = zstd::zstd_safe::CCtx<'static>;

thread_local! {
    /// A zstd context for each thread, reused by the small NARs it compresses one after the
    /// other: creating one for each (allocating and clearing its tables) was a twentieth of the
    /// CPU of a push of a thousand small paths. Small NARs only (up to [`MEMORY_SPOOL`]), so that
    /// what a thread keeps is the tables such a NAR needs: 1–2 MiB at the default level, about
    /// 17 MiB at level 19, never the window of a large NAR.
    static ZSTD_CONTEXT: RefCell<Option<ZstdContext>> = const { RefCell::new(None) };
}

/// The dictionary of xz's preset 0, the smallest of any preset.
const XZ_SMALLEST_PRESET_DICT: u64 = 256 << 10;
/// The smallest dictionary liblzma takes.
const XZ_DICT_MIN: u64 = 4096;

enum Compressor<'c, W: Write> {
    None(W),
    Zstd(zstd::stream::write::Encoder<'c, W>),
    Xz(liblzma::write::XzEncoder<W>),
}

impl<'c, W: Write> Compressor<'c, W> {
    /// `size_hint`: how many bytes are expected (the NAR's recorded size). `context`: a zstd
    /// context to compress with on this thread, instead of a new one.
    fn new(
        w: W,
        opts: &CompressOptions,
        size_hint: u64,
        context: Option<&'c mut ZstdContext>,
    ) -> io::Result<Self> {
        let level = opts.level.unwrap_or(3);
        Ok(match opts.compression {
            Compression::None => Compressor::None(w),
            Compression::Zstd => {
                let mut e = match context {
                    Some(c) => {
                        // What the last NAR set (its size hint, a level) goes with its session.
                        c.reset(zstd::zstd_safe::ResetDirective::SessionAndParameters)
                            .map_err(|code| {
                                io::Error::other(zstd::zstd_safe::get_error_name(code))
                            })?;
                        let mut e = zstd::stream::write::Encoder::with_context(w, c);
                        e.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))?;
                        e
                    }
                    None => zstd::stream::write::Encoder::new(w, level)?,
                };
                // Most NARs are a few KiB. Told so, zstd sizes its tables for them instead of
                // clearing megabytes of them for every path. A hint, not a promise: a NAR that
                // turns out longer still compresses, and is then refused for its size.
                e.set_parameter(zstd::zstd_safe::CParameter::SrcSizeHint(
                    u32::try_from(size_hint).unwrap_or(u32::MAX),
                ))?;
                if opts.threads > 1 {
                    e.multithread(opts.threads)?;
                }
                Compressor::Zstd(e)
            }
            Compression::Xz => {
                let preset = opts.level.unwrap_or(6).clamp(0, 9) as u32;
                let stream = if opts.threads > 1 {
                    liblzma::stream::MtStreamBuilder::new()
                        .preset(preset)
                        .threads(opts.threads)
                        .check(liblzma::stream::Check::Crc64)
                        .encoder()?
                } else {
                    // The encoder clears match-finder tables sized to its dictionary for every
                    // stream: about 17 MB at the default preset (0.5 MB at the least), 15 times
                    // the CPU of compressing a NAR of a few KiB. A NAR no larger than the
                    // dictionary needs no more of it (the smallest preset's, 256 KiB, bounds what
                    // is cut, so no preset's grows). A hint, as for zstd: a longer NAR still
                    // compresses, and is refused.
                    let mut lzma = liblzma::stream::LzmaOptions::new_preset(preset)?;
                    if size_hint <= XZ_SMALLEST_PRESET_DICT {
                        lzma.dict_size(size_hint.next_power_of_two().max(XZ_DICT_MIN) as u32);
                    }
                    let mut filters = liblzma::stream::Filters::new();
                    filters.lzma2(&lzma);
                    liblzma::stream::Stream::new_stream_encoder(
                        &filters,
                        liblzma::stream::Check::Crc64,
                    )?
                };
                Compressor::Xz(liblzma::write::XzEncoder::new_stream(w, stream))
            }
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::None(w) => Ok(w),
            Compressor::Zstd(e) => e.finish(),
            Compressor::Xz(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Xz(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Zstd(e) => e.flush(),
            Compressor::Xz(e) => e.flush(),
        }
    }
}

/// Streams the NAR of `info.path` from `source` through hashing and compression into a spool file
/// in `spool_dir`, then checks the NAR against what the store recorded. Blocking.
pub fn spool_nar(
    info: &PathInfo,
    source: &dyn NarSource,
    opts: &CompressOptions,
    spool_dir: &Path,
) -> Result<SpooledNar, CacheError> {
    if opts.compression == Compression::Zstd && info.nar_size <= MEMORY_SPOOL as u64 {
        ZSTD_CONTEXT.with_borrow_mut(|slot| {
            let context = slot.get_or_insert_with(ZstdContext::create);
            spool_with(info, source, opts, spool_dir, Some(context))
        })
    } else {
        spool_with(info, source, opts, spool_dir, None)
    }
}

fn spool_with(
    info: &PathInfo,
    source: &dyn NarSource,
    opts: &CompressOptions,
    spool_dir: &Path,
    context: Option<&mut ZstdContext>,
) -> Result<SpooledNar, CacheError> {
    let path = &info.path;
    let spool_err = |source: io::Error| CacheError::Spool {
        dir: spool_dir.to_owned(),
        source,
    };
    let out = SpoolWriter {
        dir: spool_dir,
        memory: Vec::new(),
        file: None,
    };
    let compressed = HashingWriter::new(out);
    let opts = CompressOptions {
        threads: if info.nar_size >= PARALLEL_MIN_NAR {
            opts.threads
        } else {
            1
        },
        ..*opts
    };
    let mut nar = Recording {
        inner: HashingWriter::new(
            Compressor::new(compressed, &opts, info.nar_size, context).map_err(spool_err)?,
        ),
        error: None,
    };
    source
        .write_nar(path, &mut nar)
        .map_err(|e| match nar.error.take() {
            // The source failed because writing the spool failed (a full disk, say): that is ours to
            // report, not the store's.
            Some(io) => spool_err(io),
            None => CacheError::Source {
                path: path.clone(),
                message: error_chain(e.as_ref()),
            },
        })?;
    let nar = nar.inner;
    let (compressor, nar_hash, nar_size) = nar.finish();
    let compressed = compressor.finish().map_err(spool_err)?;
    let (out, file_hash, file_size) = compressed.finish();
    let spool = out.finish().map_err(spool_err)?;
    if nar_hash != info.nar_hash || nar_size != info.nar_size {
        return Err(CacheError::NarMismatch {
            path: path.clone(),
            recorded_hash: info.nar_hash,
            recorded_size: info.nar_size,
            actual_hash: nar_hash,
            actual_size: nar_size,
        });
    }
    // Uncompressed, the file *is* the NAR.
    let file_hash = if opts.compression == Compression::None {
        nar_hash
    } else {
        file_hash
    };
    Ok(SpooledNar {
        spool,
        compression: opts.compression,
        file_hash,
        file_size,
        nar_hash,
        nar_size,
    })
}

/// Remembers the first write error, so that it can be told apart from an error of the source.
struct Recording<W> {
    inner: W,
    error: Option<io::Error>,
}

impl<W: Write> Write for Recording<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| {
            if self.error.is_none() {
                self.error = Some(io::Error::new(e.kind(), e.to_string()));
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SourceError;
    use nixpush_format::StorePath;
    use std::io::Read;

    /// Pretends to be the store: its "NAR" is whatever bytes it holds.
    struct Bytes(Vec<u8>);

    impl NarSource for Bytes {
        fn write_nar(&self, _: &StorePath, out: &mut dyn Write) -> Result<(), SourceError> {
            out.write_all(&self.0)?;
            Ok(())
        }
    }

    fn info(nar: &[u8], recorded_size: u64) -> PathInfo {
        PathInfo {
            path: StorePath::from_base_name(&format!("{:0>32}-spooled", 0)).unwrap(),
            deriver: None,
            nar_hash: Sha256::digest(nar),
            nar_size: recorded_size,
            references: vec![],
            registration_time: 0,
            ultimate: false,
            sigs: vec![],
            ca: None,
        }
    }

    fn decompress(compression: Compression, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match compression {
            Compression::None => out.extend_from_slice(data),
            Compression::Zstd => {
                zstd::stream::read::Decoder::new(data)
                    .unwrap()
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Compression::Xz => {
                liblzma::read::XzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
            }
        };
        out
    }

    fn spooled_bytes(s: &SpooledNar) -> Vec<u8> {
        match &s.spool {
            Spool::Memory(v) => v.clone(),
            Spool::File(f) => std::fs::read(f.path()).unwrap(),
        }
    }

    /// `nar` spooled on one thread with `compression` at its default level.
    fn spool(nar: &[u8], compression: Compression, dir: &Path) -> SpooledNar {
        let opts = CompressOptions {
            compression,
            level: None,
            threads: 1,
        };
        spool_nar(
            &info(nar, nar.len() as u64),
            &Bytes(nar.to_vec()),
            &opts,
            dir,
        )
        .unwrap()
    }

    #[test]
    fn spooled_nars_decompress_to_the_nar_and_carry_their_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let small = b"nix-archive-1 small".to_vec();
        // Past MEMORY_SPOOL once compressed, so the file spool is exercised too.
        let large: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for compression in [Compression::None, Compression::Zstd, Compression::Xz] {
            for nar in [&small, &large] {
                let s = spool(nar, compression, dir.path());
                let file = spooled_bytes(&s);
                assert_eq!(s.file_size, file.len() as u64);
                assert_eq!(s.file_hash, Sha256::digest(&file), "{compression:?}");
                assert_eq!(decompress(compression, &file), *nar, "{compression:?}");
            }
        }
    }

    /// xz's dictionary (in the LZMA2 properties of the first block's header) is fit to a small NAR,
    /// so that the encoder clears about 0.5 MB of tables (liblzma's floor), not 17 MB; a larger
    /// NAR keeps the preset's.
    #[test]
    fn a_small_nars_xz_dictionary_is_fit_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let dict = |nar: &[u8]| {
            let file = spooled_bytes(&spool(nar, Compression::Xz, dir.path()));
            assert_eq!(decompress(Compression::Xz, &file), nar);
            // Stream header (12 bytes), then the block header: its size, flags (no sizes
            // stored), the LZMA2 filter's id and properties' size, and the properties.
            assert_eq!(file[13..16], [0x00, 0x21, 0x01]);
            let d = u32::from(file[16]);
            (2 | (d & 1)) << (d / 2 + 11)
        };
        assert_eq!(dict(b"nix-archive-1 small"), 4096);
        assert_eq!(dict(&vec![7; 5000]), 8192);
        assert_eq!(dict(&vec![7; 300 << 10]), 8 << 20);
    }

    /// Compressions on one thread share a zstd context: what a NAR left in it (a frame cut off by a
    /// failing source, a level) never reaches the next NAR.
    #[test]
    fn a_threads_zstd_context_starts_afresh_for_each_nar() {
        struct Failing(Vec<u8>);
        impl NarSource for Failing {
            fn write_nar(&self, _: &StorePath, out: &mut dyn Write) -> Result<(), SourceError> {
                out.write_all(&self.0)?;
                Err(io::Error::other("the store went away").into())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let cut: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let next = b"nix-archive-1 next".to_vec();
        let zstd = |level| CompressOptions {
            compression: Compression::Zstd,
            level,
            threads: 1,
        };
        let failed = spool_nar(
            &info(&cut, cut.len() as u64),
            &Failing(cut.clone()),
            &zstd(Some(19)),
            dir.path(),
        );
        assert!(matches!(failed, Err(CacheError::Source { .. })));
        for level in [Some(1), None] {
            let (info, source) = (info(&next, next.len() as u64), Bytes(next.clone()));
            let s = spool_nar(&info, &source, &zstd(level), dir.path()).unwrap();
            assert_eq!(decompress(Compression::Zstd, &spooled_bytes(&s)), next);
            // zstd's output is a function of its input and settings: the same bytes as from a
            // context of its own.
            let fresh = spool_with(&info, &source, &zstd(level), dir.path(), None).unwrap();
            assert_eq!(s.file_hash, fresh.file_hash, "level {level:?}");
        }
    }

    /// The recorded size is also the compressor's size hint: a NAR longer or shorter than the record
    /// must still be refused as a mismatch, not fail as a compressor error.
    #[test]
    fn a_nar_whose_size_differs_from_the_record_is_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let nar = vec![7u8; 100_000];
        for recorded in [10, 99_999, 100_001, 10_000_000] {
            for compression in [Compression::None, Compression::Zstd, Compression::Xz] {
                let opts = CompressOptions {
                    compression,
                    level: None,
                    threads: 1,
                };
                match spool_nar(
                    &info(&nar, recorded),
                    &Bytes(nar.clone()),
                    &opts,
                    dir.path(),
                ) {
                    Err(CacheError::NarMismatch {
                        actual_size,
                        recorded_size,
                        ..
                    }) => {
                        assert_eq!((actual_size, recorded_size), (100_000, recorded));
                    }
                    Err(e) => panic!("{compression:?}, recorded {recorded}: {e}"),
                    Ok(_) => panic!("{compression:?}, recorded {recorded}: accepted"),
                }
            }
        }
    }
}
