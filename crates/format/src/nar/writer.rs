use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{MAGIC, Node, padding};

#[derive(Debug, Error)]
pub enum DumpError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} has an unsupported type ({kind}); a NAR holds only files, symlinks and directories"
    )]
    UnsupportedType { path: PathBuf, kind: &'static str },
    #[error("{path} changed size while being archived")]
    Changed { path: PathBuf },
    #[error("writing the NAR failed")]
    Write(#[source] io::Error),
}

struct Out<'a, W: Write> {
    w: &'a mut W,
}

impl<W: Write> Out<'_, W> {
    fn int(&mut self, n: u64) -> Result<(), DumpError> {
        self.w.write_all(&n.to_le_bytes()).map_err(DumpError::Write)
    }

    fn pad(&mut self, len: u64) -> Result<(), DumpError> {
        self.w
            .write_all(&[0u8; 8][..padding(len)])
            .map_err(DumpError::Write)
    }

    fn str(&mut self, s: &[u8]) -> Result<(), DumpError> {
        self.int(s.len() as u64)?;
        self.w.write_all(s).map_err(DumpError::Write)?;
        self.pad(s.len() as u64)
    }

    fn strs(&mut self, ss: &[&[u8]]) -> Result<(), DumpError> {
        ss.iter().try_for_each(|s| self.str(s))
    }
}

/// Writes the NAR of the tree at `path` (not following a top-level symlink), byte-identical to
/// `nix-store --dump`. File contents are streamed, never held in memory.
pub fn dump_path<W: Write>(path: &Path, w: &mut W) -> Result<(), DumpError> {
    let mut out = Out { w };
    out.str(MAGIC)?;
    dump_node(&mut out, path)
}

fn dump_node<W: Write>(out: &mut Out<'_, W>, path: &Path) -> Result<(), DumpError> {
    let io_err = |source| DumpError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(io_err)?;
    let ft = meta.file_type();
    out.strs(&[b"(", b"type"])?;
    if ft.is_file() {
        out.str(b"regular")?;
        // Nix records only the owner-execute bit.
        if meta.permissions().mode() & 0o100 != 0 {
            out.strs(&[b"executable", b""])?;
        }
        out.str(b"contents")?;
        let len = meta.len();
        out.int(len)?;
        let file = File::open(path).map_err(io_err)?;
        // Read one byte past the expected length so growth is detected, not silently truncated.
        let copied = io::copy(&mut file.take(len + 1), out.w).map_err(|e| {
            if e.kind() == io::ErrorKind::WriteZero {
                DumpError::Write(e)
            } else {
                io_err(e)
            }
        })?;
        if copied != len {
            return Err(DumpError::Changed {
                path: path.to_owned(),
            });
        }
        out.pad(len)?;
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err)?;
        out.strs(&[b"symlink", b"target", target.as_os_str().as_bytes()])?;
    } else if ft.is_dir() {
        out.str(b"directory")?;
        let mut names: Vec<_> = fs::read_dir(path)
            .map_err(io_err)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err)?;
        // Nix sorts entries by bytes, not by locale.
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            out.strs(&[b"entry", b"(", b"name", name.as_bytes(), b"node"])?;
            dump_node(out, &path.join(&name))?;
            out.str(b")")?;
        }
    } else {
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() || ft.is_char_device() {
            "device"
        } else {
            "unknown"
        };
        return Err(DumpError::UnsupportedType {
            path: path.to_owned(),
            kind,
        });
    }
    out.str(b")")
}

/// Writes the NAR of an in-memory tree. Entries are written in the map's (byte) order; the caller is
/// responsible for names being valid, which lets tests build deliberately malformed NARs.
pub fn write_node<W: Write>(node: &Node, w: &mut W) -> io::Result<()> {
    fn node_rec<W: Write>(out: &mut Out<'_, W>, node: &Node) -> Result<(), DumpError> {
        out.strs(&[b"(", b"type"])?;
        match node {
            Node::Regular {
                executable,
                contents,
            } => {
                out.str(b"regular")?;
                if *executable {
                    out.strs(&[b"executable", b""])?;
                }
                out.strs(&[b"contents", contents])?;
            }
            Node::Symlink { target } => out.strs(&[b"symlink", b"target", target])?,
            Node::Directory(entries) => {
                out.str(b"directory")?;
                for (name, child) in entries {
                    out.strs(&[b"entry", b"(", b"name", name, b"node"])?;
                    node_rec(out, child)?;
                    out.str(b")")?;
                }
            }
        }
        out.str(b")")
    }
    let mut out = Out { w };
    let result = out.str(MAGIC).and_then(|()| node_rec(&mut out, node));
    result.map_err(|e| match e {
        DumpError::Write(e) => e,
        other => io::Error::other(other.to_string()),
    })
}
