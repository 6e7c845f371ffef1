//! A TCP relay between any client and any server, for the conditions loopback never has: latency,
//! a slow uplink, and connections that misbehave.
//!
//! - **Latency**: every chunk is forwarded `delay` after it arrived, in order, in both directions, so
//!   a round trip costs about `2 × delay` while throughput stays what the link can do (chunks are not
//!   held back by the ones before them, only by time).
//! - **Bandwidth**: client → server bytes are paced to `upstream_bytes_per_sec`.
//! - **Faults**, decided once per connection from a seeded generator, with a probability, inside a
//!   time window measured from the relay's start, optionally only for requests of one kind (see
//!   [`Faults`] and [`Fault`]). Each decision is logged, so a test asserts that the faults it meant
//!   to inject really happened.
//!
//! The relay runs on a thread of its own (a one-thread Tokio runtime); dropping it closes every
//! connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// What the relay does to a connection it picked for a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// Reads the first bytes of the request, then resets the connection (RST).
    Reset,
    /// Reads the request and never answers; the connection stays open until the client gives up.
    Stall,
    /// Relays the request, then closes the connection halfway through the response's body (halfway
    /// through its head when it has no body).
    Cut,
    /// Answers `500 InternalError` itself, as S3 does now and then.
    InternalError,
    /// Answers `503 SlowDown` with `Retry-After`, as S3 does when throttling.
    SlowDown,
    /// Relays the connection with client → server bytes paced to 64 KiB/s.
    Trickle,
    /// Relays the connection with one bit flipped halfway through the body of every request,
    /// as a faulty NIC or middlebox would. Not among [`Fault::ALL`]: what the other faults do, a
    /// client notices; this one only a checksum catches.
    Corrupt,
    /// Answers a multi-object delete (DeleteObjects) itself, `200 OK` with an `InternalError` for
    /// every key it names, deleting none, as S3 does for keys under load. Not among
    /// [`Fault::ALL`]: only that request names keys to fail, so it goes with [`Faults::only`]
    /// naming it (another request would get an empty, successful answer).
    KeysBusy,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::Reset,
        Fault::Stall,
        Fault::Cut,
        Fault::InternalError,
        Fault::SlowDown,
        Fault::Trickle,
    ];
}

const TRICKLE_BYTES_PER_SEC: u64 = 64 * 1024;

/// Which connections get a fault.
#[derive(Clone, Debug)]
pub struct Faults {
    /// The generator's seed: the same seed and the same order of connections give the same faults.
    pub seed: u64,
    /// Chance that a connection accepted inside the window gets a fault.
    pub probability: f64,
    /// The faults given, in rounds: each round is these kinds in a random order, so that every kind
    /// happens once in each run of `kinds.len()` faults (a test of a few dozen faults sees them all).
    pub kinds: Vec<Fault>,
    /// When faults happen, measured from the relay's start.
    pub window: Range<Duration>,
    /// At most this many faults in all.
    pub limit: Option<usize>,
    /// The `Retry-After` seconds of [`Fault::SlowDown`].
    pub retry_after_secs: u32,
    /// [`Fault::Corrupt`] leaves request bodies shorter than this alone (a client's small
    /// bookkeeping writes go through, its uploads do not).
    pub corrupt_min_body: usize,
    /// Only connections whose first request matches get a fault; the others pass untouched and
    /// draw nothing from the generator. The relay reads that request's head before deciding. With
    /// [`RelayConfig::one_request_per_connection`], this picks requests, not connections.
    pub only: Option<RequestMatch>,
}

/// A kind of request: its method, and a piece of its target (path and query).
#[derive(Clone, Debug)]
pub struct RequestMatch {
    pub method: String,
    pub target_contains: String,
}

impl RequestMatch {
    /// Whether the request whose head is `head` is of this kind.
    fn matches(&self, head: &[u8]) -> bool {
        let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split(' ');
        parts.next() == Some(self.method.as_str())
            && parts
                .next()
                .is_some_and(|t| t.contains(&self.target_contains))
    }
}

impl Faults {
    /// No faults at all.
    pub fn none() -> Self {
        Faults {
            seed: 0,
            probability: 0.0,
            kinds: Vec::new(),
            window: Duration::ZERO..Duration::MAX,
            limit: None,
            retry_after_secs: 1,
            corrupt_min_body: 0,
            only: None,
        }
    }

    /// Every connection, from the start, gets `fault`.
    pub fn always(fault: Fault) -> Self {
        Faults {
            probability: 1.0,
            kinds: vec![fault],
            ..Faults::none()
        }
    }
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Added to every chunk in each direction.
    pub delay: Duration,
    /// Client → server pacing; `None` relays as fast as the link goes.
    pub upstream_bytes_per_sec: Option<u64>,
    pub faults: Faults,
    /// Adds `Connection: close` to each connection's first request, so that the server closes it
    /// after answering, as servers and proxies that keep no connection alive do: every request
    /// then comes on a new connection, and faults, decided per connection, hit requests.
    pub one_request_per_connection: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            delay: Duration::ZERO,
            upstream_bytes_per_sec: None,
            faults: Faults::none(),
            one_request_per_connection: false,
        }
    }
}

/// One accepted connection: when its fault was decided, and the fault.
pub type ConnectionLog = Vec<(Instant, Option<Fault>)>;

struct Shared {
    upstream: String,
    started: Instant,
    config: Mutex<RelayConfig>,
    rng: Mutex<u64>,
    /// The rest of the current round of fault kinds, taken from the end.
    round: Mutex<Vec<Fault>>,
    /// Faults as decided for each connection: when it was accepted, or once its first request's
    /// head arrived when faults are kept to some requests; and whether that request was one they
    /// are kept to (always, when they are not).
    log: Mutex<Vec<(Instant, Option<Fault>, bool)>>,
    /// Faults that really happened: the RST sent, the request read and left unanswered, the request
    /// read and the answer about to be written, the response cut, bytes trickled.
    applied: Mutex<BTreeMap<Fault, usize>>,
    /// When the shared uplink is free again: `upstream_bytes_per_sec` holds for all connections
    /// together, as on a real link.
    link_free: Mutex<tokio::time::Instant>,
}

pub struct Relay {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Ends the relay's thread, and with it every connection.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Relays `127.0.0.1:PORT` (a free port) to `upstream` (`host:port`, or an `http://` URL).
    pub fn start(upstream: &str, config: RelayConfig) -> Relay {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        // One thread: the relay stands for a network, and its CPU, on a test machine of two cores
        // shared with client and server, should be as little as can be.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot start the relay's runtime");
        assert_ne!(
            config.upstream_bytes_per_sec,
            Some(0),
            "a bandwidth of 0 relays nothing"
        );
        let listener = crate::bind_loopback();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener).unwrap()
        };
        let shared = Arc::new(Shared {
            upstream,
            started: Instant::now(),
            rng: Mutex::new(config.faults.seed),
            round: Mutex::default(),
            config: Mutex::new(config),
            log: Mutex::default(),
            applied: Mutex::default(),
            link_free: Mutex::new(tokio::time::Instant::now()),
        });
        let accept = shared.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                let accepting = async move {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            // Out of descriptors, say: let connections close before accepting more.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        tokio::spawn(accept_one(accept.clone(), client));
                    }
                };
                runtime.block_on(async {
                    tokio::select! {
                        () = accepting => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection's task, closing its sockets.
            })
            .expect("cannot start the relay's thread");
        Relay {
            endpoint: format!("http://{addr}"),
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Changes the configuration: for connections accepted from now on, and the uplink's bandwidth
    /// at once for the connections it paces (a link that opens up speeds up what is under way).
    pub fn set_config(&self, config: RelayConfig) {
        *self.shared.rng.lock().unwrap() = config.faults.seed;
        self.shared.round.lock().unwrap().clear();
        *self.shared.config.lock().unwrap() = config;
    }

    /// Every connection accepted so far, in the order of the decisions, with the fault decided for
    /// it (see [`Faults::only`]).
    pub fn connections(&self) -> ConnectionLog {
        let log = self.shared.log.lock().unwrap();
        log.iter().map(|&(at, fault, _)| (at, fault)).collect()
    }

    /// The connections whose first request is one [`Faults::only`] keeps faults to (all of them
    /// when it is not set): the attempts at the requests under test, without the others a client
    /// sent meanwhile.
    pub fn matched(&self) -> ConnectionLog {
        let log = self.shared.log.lock().unwrap();
        log.iter()
            .filter(|&&(_, _, matched)| matched)
            .map(|&(at, fault, _)| (at, fault))
            .collect()
    }

    /// How many times each fault really happened to a client.
    pub fn injected(&self) -> BTreeMap<Fault, usize> {
        self.shared.applied.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// The fault for a new connection; `eligible` is false for a request [`Faults::only`] leaves out.
    fn decide(&self, eligible: bool) -> Option<Fault> {
        let config = self.config.lock().unwrap();
        let f = &config.faults;
        let mut log = self.log.lock().unwrap();
        let given = log.iter().filter(|(_, f, _)| f.is_some()).count();
        let in_window = f.window.contains(&self.started.elapsed());
        let fault =
            if eligible && in_window && !f.kinds.is_empty() && f.limit.is_none_or(|l| given < l) {
                let mut state = self.rng.lock().unwrap();
                let roll = next_random(&mut state);
                // The top 53 bits as a uniform float in [0, 1).
                let uniform = (roll >> 11) as f64 / (1u64 << 53) as f64;
                (uniform < f.probability).then(|| {
                    let mut round = self.round.lock().unwrap();
                    if round.is_empty() {
                        // A new round: the kinds, shuffled (Fisher-Yates).
                        *round = f.kinds.clone();
                        for i in (1..round.len()).rev() {
                            let j = (next_random(&mut state) % (i as u64 + 1)) as usize;
                            round.swap(i, j);
                        }
                    }
                    round.pop().expect("a round has every kind")
                })
            } else {
                None
            };
        log.push((Instant::now(), fault, eligible));
        fault
    }

    fn config(&self) -> RelayConfig {
        self.config.lock().unwrap().clone()
    }

    fn applied(&self, fault: Fault) {
        *self.applied.lock().unwrap().entry(fault).or_default() += 1;
    }
}

/// splitmix64: a seeded, reproducible sequence is all a test needs from a generator.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Decides a new connection's fault (reading its first request's head first when faults are for
/// some requests only) and serves it.
async fn accept_one(shared: Arc<Shared>, mut client: TcpStream) {
    let only = shared.config.lock().unwrap().faults.only.clone();
    let (eligible, head) = match only {
        None => (true, Vec::new()),
        Some(only) => {
            let mut head = Vec::new();
            let mut chunk = vec![0u8; 16 * 1024];
            let read_head = async {
                while head_end(&head).is_none() && head.len() < 64 * 1024 {
                    match client.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            };
            // A connection a client opened ahead of need (a pool's spare) may say nothing for a
            // long time: it is relayed as it is, without a fault, once the wait is over.
            match tokio::time::timeout(HEAD_WAIT, read_head).await {
                Ok(true) => (only.matches(&head), head),
                Ok(false) => {
                    shared.decide(false);
                    return;
                }
                Err(_) => (false, head),
            }
        }
    };
    let fault = shared.decide(eligible);
    serve(shared, client, fault, head).await;
}

/// How long the relay waits for a connection's first request head when faults are kept to some
/// requests.
const HEAD_WAIT: Duration = Duration::from_secs(5);

/// Serves a connection as `fault` says; `read` is what was already read of it.
async fn serve(shared: Arc<Shared>, mut client: TcpStream, fault: Option<Fault>, read: Vec<u8>) {
    let config = shared.config();
    let _ = client.set_nodelay(true);
    // The request and the answer would each cross the link once.
    let answer_delay = 2 * config.delay;
    match fault {
        Some(Fault::Reset) => {
            let mut buf = [0u8; 1024];
            if !read.is_empty() || matches!(client.read(&mut buf).await, Ok(n) if n > 0) {
                // Linger zero turns the close into a RST.
                if client.set_zero_linger().is_ok() {
                    shared.applied(Fault::Reset);
                }
            }
        }
        Some(Fault::Stall) => {
            let mut buf = vec![0u8; 64 * 1024];
            if !read.is_empty() || matches!(client.read(&mut buf).await, Ok(n) if n > 0) {
                shared.applied(Fault::Stall);
                while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        }
        Some(Fault::InternalError) => {
            let body = Body::Fixed(s3_error(
                "InternalError",
                "We encountered an internal error. Please try again.",
            ));
            let status = "500 Internal Server Error";
            answer(&mut client, read, status, "", body, answer_delay, || {
                shared.applied(Fault::InternalError)
            })
            .await;
        }
        Some(Fault::SlowDown) => {
            let body = Body::Fixed(s3_error("SlowDown", "Please reduce your request rate."));
            let retry = format!("Retry-After: {}\r\n", config.faults.retry_after_secs);
            answer(
                &mut client,
                read,
                "503 Slow Down",
                &retry,
                body,
                answer_delay,
                || shared.applied(Fault::SlowDown),
            )
            .await;
        }
        Some(Fault::KeysBusy) => {
            answer(
                &mut client,
                read,
                "200 OK",
                "",
                Body::Of(keys_failed),
                answer_delay,
                || shared.applied(Fault::KeysBusy),
            )
            .await;
        }
        Some(Fault::Cut | Fault::Trickle | Fault::Corrupt) | None => {
            let Ok(server) = TcpStream::connect(&shared.upstream).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            let pace = match (fault, config.upstream_bytes_per_sec) {
                (Some(Fault::Trickle), _) => Pace::Own(TRICKLE_BYTES_PER_SEC),
                (_, Some(_)) => Pace::Link,
                (_, None) => Pace::None,
            };
            let close = config.one_request_per_connection;
            let link = Link {
                delay: config.delay,
                pace,
                fault,
                close,
            };
            pipe(&shared, client, read, server, link).await;
        }
    }
}

/// DeleteObjects' answer that fails every key its request names, deleting none.
fn keys_failed(request: &[u8]) -> String {
    let errors: String = xml_values(request, "Key")
        .iter()
        .map(|key| {
            format!(
                "<Error><Key>{key}</Key><Code>InternalError</Code>\
                 <Message>We encountered an internal error. Please try again.</Message></Error>"
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <DeleteResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">{errors}</DeleteResult>"
    )
}

fn s3_error(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
}

/// The body of the relay's own answer: fixed, or made from the request's body (which is then kept;
/// otherwise it is read and dropped, as uploads can be large).
enum Body {
    Fixed(String),
    Of(fn(&[u8]) -> String),
}

/// Reads one request (of which `read` has arrived), answers it with `status` after `delay`, and
/// closes gracefully (see [`drain`]). `counted` runs just before the answer is written, so that a
/// client holding the answer finds the fault counted (a client gone by then is counted too).
async fn answer(
    client: &mut TcpStream,
    read: Vec<u8>,
    status: &str,
    headers: &str,
    body: Body,
    delay: Duration,
    counted: impl FnOnce(),
) {
    let keep_body = matches!(body, Body::Of(_));
    let Ok((method, request)) = read_request(client, read, keep_body).await else {
        return;
    };
    tokio::time::sleep(delay).await;
    let body = match body {
        // The answer to a HEAD has no body.
        _ if method == "HEAD" => String::new(),
        Body::Fixed(body) => body,
        Body::Of(make) => make(&request),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    counted();
    if client.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let _ = client.shutdown().await;
    drain(client).await;
}

/// Reads what the client still sends until it closes (10 s at most): closing with unread request
/// bytes would make the kernel send a RST that can destroy the answer before the client reads it.
async fn drain(client: &mut TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let read_all = async { while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(10), read_all).await;
}

/// Reads a request's head and body (by `Content-Length`, or chunked to its last chunk), of which
/// `buf` has arrived, and returns its method, and its body if `keep_body` (chunked bodies are
/// returned with their framing). A client that sent `Expect: 100-continue` sends no body before an
/// answer, so none is read.
async fn read_request(
    client: &mut TcpStream,
    mut buf: Vec<u8>,
    keep_body: bool,
) -> std::io::Result<(String, Vec<u8>)> {
    let mut chunk = vec![0u8; 64 * 1024];
    let head_len = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
    let method = head.split(' ').next().unwrap_or("").to_ascii_uppercase();
    let body = |buf: &[u8]| {
        if keep_body {
            buf[head_len..].to_vec()
        } else {
            Vec::new()
        }
    };
    if header(&head, "expect").is_some_and(|v| v.contains("100-continue")) {
        return Ok((method, Vec::new()));
    }
    if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while !buf[head_len..].ends_with(b"0\r\n\r\n") {
            let n = client.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Ok((method, body(&buf)));
    }
    let length: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut left = (head_len + length).saturating_sub(buf.len());
    while left > 0 {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        left = left.saturating_sub(n);
        // Uploads answered by a fault can be large; only a body asked for is kept.
        if keep_body {
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    Ok((method, body(&buf)))
}

/// The text of each `<name>` element in `xml`, in order (no nesting or attributes: enough for the
/// keys of a DeleteObjects request).
fn xml_values(xml: &[u8], name: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(xml).into_owned();
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    let mut values = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let Some(end) = rest.find(&close) else { break };
        values.push(rest[..end].to_owned());
        rest = &rest[end + close.len()..];
    }
    values
}

/// The length of an HTTP head (through its blank line), once `buf` holds all of it.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Follows the requests in a client's stream (heads, and bodies by `Content-Length`) and flips one
/// bit in the middle of each body of at least `min_body` bytes.
#[derive(Default)]
struct BodyFlipper {
    min_body: usize,
    /// Stream offset where the current request's head begins, once the previous body has passed.
    start: usize,
    /// The current head so far.
    head: Vec<u8>,
    /// Stream offset of the bit to flip in the current body, and where the next request starts.
    body: Option<(usize, usize)>,
}

impl BodyFlipper {
    /// Looks at `data`, which begins at stream offset `offset`, flipping what falls in it; returns
    /// how many bits were flipped.
    fn flip(&mut self, offset: usize, data: &mut [u8]) -> usize {
        let mut flipped = 0;
        let mut at = offset;
        let end = offset + data.len();
        while at < end {
            if let Some((middle, next)) = self.body {
                if (at..end).contains(&middle) {
                    data[middle - offset] ^= 0x01;
                    flipped += 1;
                }
                if next > end {
                    return flipped;
                }
                at = next;
                self.start = next;
                self.body = None;
                continue;
            }
            self.head.extend_from_slice(&data[at - offset..]);
            let Some(len) = head_end(&self.head) else {
                // A head longer than any real one: not HTTP, leave the rest alone.
                if self.head.len() > 64 * 1024 {
                    self.start = usize::MAX;
                    self.body = Some((usize::MAX, usize::MAX));
                }
                return flipped;
            };
            let head = String::from_utf8_lossy(&self.head[..len]).to_ascii_lowercase();
            let body: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let body_start = self.start + len;
            let middle = if body > 0 && body >= self.min_body {
                body_start + body / 2
            } else {
                usize::MAX
            };
            self.body = Some((middle, body_start + body));
            self.head.clear();
            at = self.start + len;
        }
        flipped
    }
}

/// A header's trimmed value in a lowercased head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        (n.trim() == name).then(|| v.trim())
    })
}

/// A chunk on its way through a delay line, or the end of its direction.
enum Segment {
    Data(Instant, Vec<u8>),
    End,
}

/// Chunks buffered per direction: enough for a delay of tens of milliseconds at loopback speed, so
/// the delay line does not limit throughput, and a bound so a slow writer holds the reader back.
const DELAY_LINE_CHUNKS: usize = 1024;

/// How client → server bytes are paced. Pacing happens as they are read, so a client feels a slow
/// uplink as writes that take their time, as it would on a real one.
#[derive(Clone, Copy)]
enum Pace {
    None,
    /// This connection alone (a trickle).
    Own(u64),
    /// The link that all connections share, at its rate of the moment (see [`Relay::set_config`]).
    Link,
}

/// How a relayed connection behaves.
struct Link {
    delay: Duration,
    pace: Pace,
    fault: Option<Fault>,
    /// Add `Connection: close` to the first request.
    close: bool,
}

/// Relays both directions until the server's side ends (or the response is cut); `read` is what
/// was already read from the client.
async fn pipe(
    shared: &Arc<Shared>,
    client: TcpStream,
    read: Vec<u8>,
    server: TcpStream,
    link: Link,
) {
    let Link {
        delay,
        pace,
        fault,
        close,
    } = link;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // The method of the first request tells whether its response has a body (HEAD has none).
    let (method_tx, method_rx) = oneshot::channel();
    let up = tokio::spawn(direction(
        shared.clone(),
        (read, client_read),
        server_write,
        delay,
        pace,
        Watch::Method(Some(method_tx), close),
        fault,
    ));
    let watch = if fault == Some(Fault::Cut) {
        Watch::Cut(Some(method_rx))
    } else {
        Watch::None
    };
    let down = direction(
        shared.clone(),
        (Vec::new(), server_read),
        client_write,
        delay,
        Pace::None,
        watch,
        fault,
    );
    down.await;
    up.abort();
}

/// What a direction looks at in the bytes it relays.
enum Watch {
    None,
    /// Client → server: report the first request's method; with `true`, add `Connection: close`
    /// to it.
    Method(Option<oneshot::Sender<String>>, bool),
    /// Server → client: end the relay halfway through the first response.
    Cut(Option<oneshot::Receiver<String>>),
}

/// Where to cut a response that begins with `seen`, once its final head has arrived: halfway
/// through its body, or through its head when it has none. Interim `1xx` heads (`100 Continue`) are
/// passed over.
fn cut_point(seen: &[u8], is_head: bool) -> Option<usize> {
    let mut start = 0;
    loop {
        let len = head_end(&seen[start..])?;
        let head = String::from_utf8_lossy(&seen[start..start + len]).to_ascii_lowercase();
        if head
            .split(' ')
            .nth(1)
            .is_some_and(|code| code.starts_with('1'))
        {
            start += len;
            continue;
        }
        let body: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let chunked = header(&head, "transfer-encoding").is_some();
        return Some(
            start
                + match (is_head, body, chunked) {
                    (false, b, _) if b > 0 => len + b / 2,
                    (false, _, true) => len + 1,
                    _ => len / 2,
                },
        );
    }
}

/// Reads from `from` (after what was already read of it) into a delay line, paced as `pace` says; a
/// writer releases each chunk `delay` after it arrived.
async fn direction(
    shared: Arc<Shared>,
    (read, mut from): (Vec<u8>, OwnedReadHalf),
    mut to: OwnedWriteHalf,
    delay: Duration,
    pace: Pace,
    mut watch: Watch,
    fault: Option<Fault>,
) {
    let (tx, mut rx) = mpsc::channel::<Segment>(DELAY_LINE_CHUNKS);
    let writer = async move {
        while let Some(Segment::Data(arrived, data)) = rx.recv().await {
            tokio::time::sleep_until((arrived + delay).into()).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        // Small reads keep a paced stream smooth.
        let mut buf = vec![
            0u8;
            if matches!(pace, Pace::None) {
                64 * 1024
            } else {
                4096
            }
        ];
        let mut seen = Vec::new();
        let mut is_head = None;
        let mut cut_at: Option<usize> = None;
        let mut forwarded = 0usize;
        let mut own_free = tokio::time::Instant::now();
        let mut flipper = (fault == Some(Fault::Corrupt) && matches!(watch, Watch::Method(..)))
            .then(|| BodyFlipper {
                min_body: shared.config.lock().unwrap().faults.corrupt_min_body,
                ..BodyFlipper::default()
            });
        let mut read = Some(read).filter(|r| !r.is_empty());
        loop {
            let mut data = match read.take() {
                Some(data) => data,
                None => match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf[..n].to_vec(),
                },
            };
            let n = data.len();
            let cost = |rate: u64| Duration::from_secs_f64(n as f64 / rate as f64);
            let ready = match pace {
                Pace::None => None,
                Pace::Own(rate) => {
                    own_free = own_free.max(tokio::time::Instant::now()) + cost(rate);
                    Some(own_free)
                }
                Pace::Link => {
                    let rate = shared.config.lock().unwrap().upstream_bytes_per_sec;
                    rate.map(|rate| {
                        let mut free = shared.link_free.lock().unwrap();
                        *free = (*free).max(tokio::time::Instant::now()) + cost(rate);
                        *free
                    })
                }
            };
            if let Some(ready) = ready {
                tokio::time::sleep_until(ready).await;
                if forwarded == 0 && fault == Some(Fault::Trickle) {
                    shared.applied(Fault::Trickle);
                }
            }
            match &mut watch {
                Watch::None => {}
                Watch::Method(tx, close) => {
                    if tx.is_some() {
                        seen.extend_from_slice(&data);
                        if let Some(line_end) = seen.windows(2).position(|w| w == b"\r\n") {
                            let line = String::from_utf8_lossy(&seen[..line_end]);
                            let method = line.split(' ').next().unwrap_or("").to_owned();
                            let _ = tx.take().unwrap().send(method);
                            if *close {
                                // Right after the request line, which ends in this chunk.
                                let at = (line_end + 2).saturating_sub(seen.len() - data.len());
                                data.splice(at..at, b"Connection: close\r\n".iter().copied());
                            }
                        }
                    }
                }
                Watch::Cut(method) => {
                    if cut_at.is_none() {
                        seen.extend_from_slice(&data);
                        if head_end(&seen).is_some() {
                            if is_head.is_none() {
                                let rx = method.take().expect("asked once");
                                is_head = Some(rx.await.is_ok_and(|m| m == "HEAD"));
                            }
                            cut_at = cut_point(&seen, is_head == Some(true));
                        }
                    }
                    if let Some(at) = cut_at {
                        let room = at.saturating_sub(forwarded);
                        if data.len() >= room {
                            data.truncate(room);
                            if !data.is_empty() {
                                let _ = tx.send(Segment::Data(Instant::now(), data)).await;
                            }
                            shared.applied(Fault::Cut);
                            break;
                        }
                    }
                }
            }
            if let Some(flipper) = &mut flipper {
                for _ in 0..flipper.flip(forwarded, &mut data) {
                    shared.applied(Fault::Corrupt);
                }
            }
            forwarded += data.len();
            if tx.send(Segment::Data(Instant::now(), data)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Segment::End).await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bit_is_flipped_in_the_middle_of_every_body_however_the_stream_is_split() {
        let get = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let put = |body: &[u8]| {
            let mut r =
                format!("PUT /y HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            r.extend_from_slice(body);
            r
        };
        let stream = [get.clone(), put(b"0123456789"), get, put(b"abcd")].concat();
        let mut expected = stream.clone();
        let first = stream.windows(10).position(|w| w == b"0123456789").unwrap();
        expected[first + 5] ^= 1;
        let second = stream.windows(4).position(|w| w == b"abcd").unwrap();
        expected[second + 2] ^= 1;
        for split in [1, 3, 7, 16, stream.len()] {
            let mut flipper = BodyFlipper::default();
            let mut out = stream.clone();
            let mut flipped = 0;
            for (i, chunk) in out.chunks_mut(split).enumerate() {
                flipped += flipper.flip(i * split, chunk);
            }
            assert_eq!(flipped, 2, "split {split}");
            assert_eq!(out, expected, "split {split}");
        }
    }

    #[test]
    fn bodies_shorter_than_the_minimum_go_through_untouched() {
        let put = |body: &[u8]| {
            let mut r =
                format!("PUT /y HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            r.extend_from_slice(body);
            r
        };
        let stream = [put(b"short"), put(b"long enough")].concat();
        let mut flipper = BodyFlipper {
            min_body: 8,
            ..BodyFlipper::default()
        };
        let mut out = stream.clone();
        assert_eq!(flipper.flip(0, &mut out), 1);
        assert_eq!(&out[..stream.len() - 11], &stream[..stream.len() - 11]);
        assert_ne!(out, stream);
    }

    #[test]
    fn a_response_is_cut_halfway_through_its_body_after_any_interim_heads() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
        assert_eq!(cut_point(head, false), Some(head.len() + 50));
        // A HEAD's answer has no body: cut inside the head.
        assert_eq!(cut_point(head, true), Some(head.len() / 2));
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        let both = [&interim[..], &head[..]].concat();
        assert_eq!(
            cut_point(&both, false),
            Some(interim.len() + head.len() + 50)
        );
        // Only the interim head so far: not yet.
        assert_eq!(cut_point(interim, false), None);
        let empty = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(cut_point(empty, false), Some(empty.len() / 2));
    }
}
