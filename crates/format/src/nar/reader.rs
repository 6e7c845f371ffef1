use std::io::{self, Read, Write};

use thiserror::Error;

use super::{MAGIC, padding};

/// Bounds on what the reader accepts, so hostile input cannot make it allocate or recurse without
/// limit. The defaults are the bounds Nix 2.35 enforces (it refuses 64 or more nested directories).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Directories nested inside each other, counting the outermost.
    pub max_depth: usize,
    pub max_name: usize,
    pub max_target: usize,
    pub max_tag: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: 63,
            max_name: 255,
            max_target: 4095,
            max_tag: 32,
        }
    }
}

#[derive(Debug, Error)]
pub enum NarError {
    #[error("reading the NAR failed at byte {offset}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("the NAR ends early, at byte {offset}")]
    Truncated { offset: u64 },
    #[error("writing the NAR failed")]
    Write(#[source] io::Error),
    #[error("not a NAR: the `nix-archive-1` header is missing")]
    NotANar,
    #[error("malformed NAR at byte {offset}: expected {expected}, found {found:?}")]
    Unexpected {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    #[error("malformed NAR at byte {offset}: non-zero padding")]
    Padding { offset: u64 },
    #[error("malformed NAR at byte {offset}: {what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        offset: u64,
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("malformed NAR at byte {offset}: entry name {name:?} is invalid ({why})")]
    BadName {
        offset: u64,
        name: String,
        why: &'static str,
    },
    #[error(
        "malformed NAR at byte {offset}: directory is not sorted ({name:?} after {previous:?})"
    )]
    NotSorted {
        offset: u64,
        previous: String,
        name: String,
    },
    #[error("malformed NAR at byte {offset}: symlink target is invalid ({why})")]
    BadTarget { offset: u64, why: &'static str },
    #[error("malformed NAR at byte {offset}: directories nested deeper than {max}")]
    TooDeep { offset: u64, max: usize },
}

/// Receives the structure of a NAR as it is read. Every method defaults to doing nothing.
pub trait NarVisitor {
    /// A regular file of `size` bytes starts; its bytes follow through [`NarVisitor::contents`].
    fn regular(&mut self, _executable: bool, _size: u64) {}
    fn contents(&mut self, _chunk: &[u8]) {}
    fn symlink(&mut self, _target: &[u8]) {}
    fn enter_directory(&mut self) {}
    /// The next node belongs to the entry `name` of the current directory.
    fn entry(&mut self, _name: &[u8]) {}
    fn leave_directory(&mut self) {}
}

impl NarVisitor for () {}

/// Reads and validates one NAR from `r`, consuming exactly its bytes. Returns the NAR's size.
pub fn read_nar<R: Read, V: NarVisitor>(
    r: &mut R,
    visitor: &mut V,
    limits: &Limits,
) -> Result<u64, NarError> {
    let mut p = Parser {
        r,
        pos: 0,
        limits,
        buf: Vec::new(),
    };
    let magic = p.bytes(limits.max_tag, "tag").map_err(|e| match e {
        NarError::TooLong { .. } | NarError::Padding { .. } => NarError::NotANar,
        e => e,
    })?;
    if magic != MAGIC {
        return Err(NarError::NotANar);
    }
    p.node(visitor, 0)?;
    Ok(p.pos)
}

/// Copies one NAR from `r` to `w`, validating it, and stops exactly at its end: the way to take a
/// NAR off a stream that does not frame it. Returns the NAR's size.
pub fn copy_nar<R: Read, W: Write>(r: &mut R, w: &mut W) -> Result<u64, NarError> {
    let mut tee = Tee {
        r,
        w,
        write_error: None,
    };
    let result = read_nar(&mut tee, &mut (), &Limits::default());
    match tee.write_error {
        Some(e) => Err(NarError::Write(e)),
        None => result,
    }
}

struct Tee<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
    write_error: Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        if let Err(e) = self.w.write_all(&buf[..n]) {
            // Surface it as a read failure to stop the parser; copy_nar reports the real cause.
            let kind = e.kind();
            self.write_error = Some(e);
            return Err(io::Error::new(kind, "write failed"));
        }
        Ok(n)
    }
}

struct Parser<'a, R> {
    r: &'a mut R,
    pos: u64,
    limits: &'a Limits,
    buf: Vec<u8>,
}

const CHUNK: usize = 64 * 1024;

impl<R: Read> Parser<'_, R> {
    fn fill(&mut self, out: &mut [u8]) -> Result<(), NarError> {
        self.r.read_exact(out).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                NarError::Truncated { offset: self.pos }
            } else {
                NarError::Read {
                    offset: self.pos,
                    source,
                }
            }
        })?;
        self.pos += out.len() as u64;
        Ok(())
    }

    fn int(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn skip_padding(&mut self, len: u64) -> Result<(), NarError> {
        let n = padding(len);
        let mut pad = [0u8; 8];
        let at = self.pos;
        self.fill(&mut pad[..n])?;
        if pad[..n].iter().any(|&b| b != 0) {
            return Err(NarError::Padding { offset: at });
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes into an owned buffer.
    fn bytes(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, NarError> {
        let at = self.pos;
        let len = self.int()?;
        if len > max as u64 {
            return Err(NarError::TooLong {
                offset: at,
                what,
                len,
                max,
            });
        }
        let mut v = vec![0u8; len as usize];
        self.fill(&mut v)?;
        self.skip_padding(len)?;
        Ok(v)
    }

    fn tag(&mut self) -> Result<(u64, Vec<u8>), NarError> {
        let at = self.pos;
        Ok((at, self.bytes(self.limits.max_tag, "tag")?))
    }

    fn expect(&mut self, want: &'static str) -> Result<(), NarError> {
        let (offset, got) = self.tag()?;
        if got != want.as_bytes() {
            return Err(unexpected(offset, want, &got));
        }
        Ok(())
    }

    fn node<V: NarVisitor>(&mut self, v: &mut V, depth: usize) -> Result<(), NarError> {
        self.expect("(")?;
        self.expect("type")?;
        let (offset, kind) = self.tag()?;
        match kind.as_slice() {
            b"regular" => {
                let (mut offset, mut next) = self.tag()?;
                let executable = next == b"executable";
                if executable {
                    self.expect("")?;
                    (offset, next) = self.tag()?;
                }
                if next != b"contents" {
                    return Err(unexpected(offset, "contents", &next));
                }
                let size = self.int()?;
                v.regular(executable, size);
                self.buf.resize(CHUNK, 0);
                let mut buf = std::mem::take(&mut self.buf);
                let mut left = size;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    self.fill(&mut buf[..n])?;
                    v.contents(&buf[..n]);
                    left -= n as u64;
                }
                self.buf = buf;
                self.skip_padding(size)?;
            }
            b"symlink" => {
                self.expect("target")?;
                let at = self.pos;
                let target = self.bytes(self.limits.max_target, "symlink target")?;
                if target.is_empty() {
                    return Err(NarError::BadTarget {
                        offset: at,
                        why: "empty",
                    });
                }
                if target.contains(&0) {
                    return Err(NarError::BadTarget {
                        offset: at,
                        why: "contains NUL",
                    });
                }
                v.symlink(&target);
            }
            b"directory" => {
                if depth >= self.limits.max_depth {
                    return Err(NarError::TooDeep {
                        offset,
                        max: self.limits.max_depth,
                    });
                }
                v.enter_directory();
                let mut previous: Option<Vec<u8>> = None;
                loop {
                    let (offset, tok) = self.tag()?;
                    match tok.as_slice() {
                        b")" => break,
                        b"entry" => {}
                        _ => return Err(unexpected(offset, "`entry` or `)`", &tok)),
                    }
                    self.expect("(")?;
                    self.expect("name")?;
                    let at = self.pos;
                    let name = self.bytes(self.limits.max_name, "entry name")?;
                    check_name(at, &name)?;
                    if let Some(prev) = previous.as_ref().filter(|p| name <= **p) {
                        return Err(NarError::NotSorted {
                            offset: at,
                            previous: lossy(prev),
                            name: lossy(&name),
                        });
                    }
                    v.entry(&name);
                    self.expect("node")?;
                    self.node(v, depth + 1)?;
                    self.expect(")")?;
                    previous = Some(name);
                }
                v.leave_directory();
                // The directory's closing parenthesis ended the loop above.
                return Ok(());
            }
            _ => {
                return Err(unexpected(
                    offset,
                    "`regular`, `symlink` or `directory`",
                    &kind,
                ));
            }
        }
        self.expect(")")
    }
}

fn check_name(offset: u64, name: &[u8]) -> Result<(), NarError> {
    let why = if name.is_empty() {
        "empty"
    } else if name == b"." || name == b".." {
        "`.` or `..`"
    } else if name.contains(&b'/') {
        "contains `/`"
    } else if name.contains(&0) {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(NarError::BadName {
        offset,
        name: lossy(name),
        why,
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unexpected(offset: u64, expected: &'static str, found: &[u8]) -> NarError {
    NarError::Unexpected {
        offset,
        expected,
        found: lossy(found),
    }
}
