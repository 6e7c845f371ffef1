//! Unix-socket connections with deadlines, for the nix-daemon's socket and the hook's.
//!
//! `UnixStream::connect` has no timeout, and a connect to a listener whose backlog is full (a
//! daemon that stopped accepting) blocks until the listener goes away. Linux bounds that wait by
//! the socket's send timeout, so it is set before connecting.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

/// Connects to `path`, giving up after `connect` when the listener accepts nothing; reads and
/// writes on the returned stream time out after `io` (an error of kind `WouldBlock` or
/// `TimedOut`).
pub fn connect(path: &Path, connect: Duration, io: Duration) -> io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_write_timeout(Some(connect))?;
    socket.connect(&SockAddr::unix(path)?)?;
    let stream: UnixStream = socket.into();
    stream.set_read_timeout(Some(io))?;
    stream.set_write_timeout(Some(io))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: connecting to a listener that accepts nothing blocked for as long as it lived.
    #[test]
    fn a_listener_that_accepts_nothing_costs_the_connect_timeout() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        // Fill the backlog with connections nobody accepts.
        let mut held = Vec::new();
        let blocked = loop {
            match connect(&path, Duration::from_millis(200), Duration::from_secs(1)) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 1000, "the backlog never filled");
        };
        assert!(
            matches!(
                blocked.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{blocked:?}"
        );
        // Reads time out too: nobody will ever answer.
        let mut s = held.pop().unwrap();
        let e = io::Read::read(&mut s, &mut [0u8; 8]).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e:?}"
        );
    }
}
