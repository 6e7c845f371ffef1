//! The relay against a real server (s3s-fs's anonymous view) and a plain HTTP client: each fault
//! is injected when asked, counted, and seen by the client as what it imitates.

use std::time::{Duration, Instant};

use nixpush_testbed::{Fault, Faults, Relay, RelayConfig, RequestMatch, S3Server};

const BLOB: usize = 256 * 1024;

/// The status and headers of an answer, then its body or why reading it failed.
type Answer = (
    reqwest::StatusCode,
    reqwest::header::HeaderMap,
    Result<Vec<u8>, reqwest::Error>,
);

struct Bench {
    s3: S3Server,
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Bench {
    fn new() -> Self {
        let s3 = S3Server::start();
        s3.put("blob", &vec![7u8; BLOB]);
        Bench {
            s3,
            rt: tokio::runtime::Runtime::new().unwrap(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap(),
        }
    }

    fn relay(&self, config: RelayConfig) -> Relay {
        let upstream = self.s3.http_url.rsplit_once('/').unwrap().0;
        Relay::start(upstream, config)
    }

    /// GETs the blob through `relay`.
    fn get(&self, relay: &Relay) -> Result<Answer, reqwest::Error> {
        let url = format!("{}/{}/blob", relay.endpoint, self.s3.bucket);
        self.rt.block_on(async {
            let r = self.client.get(url).send().await?;
            let (status, headers) = (r.status(), r.headers().clone());
            Ok((status, headers, r.bytes().await.map(|b| b.to_vec())))
        })
    }

    /// PUTs `body` through `relay` with the bench's client (connections kept alive, 3 s deadline).
    fn put_body(&self, relay: &Relay, key: &str, body: Vec<u8>) -> reqwest::StatusCode {
        let url = format!("{}/{}/{key}", relay.endpoint, self.s3.bucket);
        self.rt
            .block_on(async { self.client.put(url).body(body).send().await })
            .unwrap()
            .status()
    }

    fn put(&self, relay: &Relay, key: &str, len: usize) -> reqwest::StatusCode {
        let url = format!("{}/{}/{key}", relay.endpoint, self.s3.bucket);
        self.rt.block_on(async {
            let client = reqwest::Client::new();
            client
                .put(url)
                .body(vec![1u8; len])
                .send()
                .await
                .unwrap()
                .status()
        })
    }
}

/// Whether an I/O error of `kind` is somewhere in `e`'s chain of causes.
fn caused_by(e: &(dyn std::error::Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn only(fault: Fault) -> RelayConfig {
    RelayConfig {
        faults: Faults::always(fault),
        ..RelayConfig::default()
    }
}

#[test]
fn each_fault_is_injected_counted_and_seen_by_a_plain_client() {
    let b = Bench::new();

    let relay = b.relay(RelayConfig::default());
    let (status, _, body) = b.get(&relay).unwrap();
    assert_eq!((status.as_u16(), body.unwrap().len()), (200, BLOB));
    assert!(relay.injected().is_empty());

    let relay = b.relay(only(Fault::Reset));
    let e = b.get(&relay).unwrap_err();
    assert!(
        caused_by(&e, std::io::ErrorKind::ConnectionReset),
        "not a reset: {e:?}"
    );
    assert_eq!(relay.injected()[&Fault::Reset], 1);

    let relay = b.relay(only(Fault::Stall));
    let e = b.get(&relay).unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert_eq!(relay.injected()[&Fault::Stall], 1);

    let relay = b.relay(only(Fault::Cut));
    let (status, headers, body) = b.get(&relay).unwrap();
    assert_eq!(status.as_u16(), 200);
    assert_eq!(headers["content-length"], BLOB.to_string().as_str());
    let e = body.unwrap_err();
    assert!(e.is_body() || e.is_decode(), "{e:?}");
    assert_eq!(relay.injected()[&Fault::Cut], 1);

    let relay = b.relay(only(Fault::InternalError));
    let (status, _, body) = b.get(&relay).unwrap();
    assert_eq!(status.as_u16(), 500);
    assert!(
        String::from_utf8(body.unwrap())
            .unwrap()
            .contains("<Code>InternalError</Code>")
    );

    let relay = b.relay(RelayConfig {
        faults: Faults {
            retry_after_secs: 7,
            ..Faults::always(Fault::SlowDown)
        },
        ..RelayConfig::default()
    });
    let (status, headers, body) = b.get(&relay).unwrap();
    assert_eq!(status.as_u16(), 503);
    assert_eq!(headers["retry-after"], "7");
    assert!(
        String::from_utf8(body.unwrap())
            .unwrap()
            .contains("<Code>SlowDown</Code>")
    );

    // A trickle cannot be faster than 64 KiB/s: 128 KiB take at least two seconds, less the first
    // piece. (A lower bound, which no load on the machine can break.)
    let relay = b.relay(only(Fault::Trickle));
    let start = Instant::now();
    assert!(b.put(&relay, "trickled", 128 * 1024).is_success());
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(b.s3.get("trickled").unwrap().len(), 128 * 1024);
    assert_eq!(relay.injected()[&Fault::Trickle], 1);
}

#[test]
fn delay_and_bandwidth_are_lower_bounds_on_time() {
    let b = Bench::new();
    // A request and its answer each wait 100 ms.
    let relay = b.relay(RelayConfig {
        delay: Duration::from_millis(100),
        ..RelayConfig::default()
    });
    for _ in 0..3 {
        let start = Instant::now();
        let (status, _, body) = b.get(&relay).unwrap();
        assert_eq!((status.as_u16(), body.unwrap().len()), (200, BLOB));
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
    }
    // 1 MiB up at 1 MiB/s, in two connections at once: the limit is the link's, not each
    // connection's.
    let relay = b.relay(RelayConfig {
        upstream_bytes_per_sec: Some(1 << 20),
        ..RelayConfig::default()
    });
    let start = Instant::now();
    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(|| b.put(&relay, "paced-1", 512 * 1024));
        let two = s.spawn(|| b.put(&relay, "paced-2", 512 * 1024));
        (one.join().unwrap(), two.join().unwrap())
    });
    assert!(one.is_success() && two.is_success());
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "{:?}",
        start.elapsed()
    );
}

/// Connects `n` times and waits until the relay has accepted them all. (The connections carry no
/// request, so faults are decided for them but not applied: these tests are about the decisions.)
fn connect(relay: &Relay, n: usize) {
    let before = relay.connections().len();
    for _ in 0..n {
        drop(std::net::TcpStream::connect(relay.addr).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay.connections().len() < before + n {
        assert!(
            Instant::now() < deadline,
            "the relay did not accept {n} connections"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn faults_follow_their_seed_probability_window_and_limit() {
    let b = Bench::new();
    let mixed = |seed| RelayConfig {
        faults: Faults {
            seed,
            probability: 0.25,
            kinds: Fault::ALL.to_vec(),
            ..Faults::none()
        },
        ..RelayConfig::default()
    };
    let faults = |r: &Relay| r.connections().iter().map(|(_, f)| *f).collect::<Vec<_>>();
    let (one, two, other) = (b.relay(mixed(11)), b.relay(mixed(11)), b.relay(mixed(12)));
    for r in [&one, &two, &other] {
        connect(r, 400);
    }
    assert_eq!(
        faults(&one),
        faults(&two),
        "the same seed gives the same faults"
    );
    assert_ne!(faults(&one), faults(&other));
    let given: Vec<Fault> = faults(&one).into_iter().flatten().collect();
    assert!(
        (60..=140).contains(&given.len()),
        "{} faults in 400 connections at 25%",
        given.len()
    );
    let kinds: std::collections::BTreeSet<_> = given.iter().collect();
    assert_eq!(kinds.len(), Fault::ALL.len(), "{given:?}");

    // A window not yet open injects nothing; a limit stops injecting.
    let later = b.relay(RelayConfig {
        faults: Faults {
            window: Duration::from_secs(3600)..Duration::MAX,
            ..Faults::always(Fault::Reset)
        },
        ..RelayConfig::default()
    });
    connect(&later, 20);
    assert!(faults(&later).iter().all(Option::is_none));
    later.set_config(RelayConfig {
        faults: Faults {
            limit: Some(3),
            ..Faults::always(Fault::Reset)
        },
        ..RelayConfig::default()
    });
    connect(&later, 20);
    assert_eq!(faults(&later).iter().flatten().count(), 3);
}

/// A client that keeps connections alive makes one for three requests, unless the relay asks the
/// server to close each after its answer: then three, each request answered in full.
#[test]
fn one_request_per_connection_makes_every_request_a_new_connection() {
    let b = Bench::new();
    // Kept alive, a connection may still be on its way back to the pool when the next request
    // starts: fewer than three, not always one.
    for (close, connections) in [(false, 1..3), (true, 3..4)] {
        let relay = b.relay(RelayConfig {
            one_request_per_connection: close,
            ..RelayConfig::default()
        });
        for _ in 0..3 {
            let (status, _, body) = b.get(&relay).unwrap();
            assert_eq!(status, 200);
            assert_eq!(body.unwrap().len(), BLOB);
        }
        let made = relay.connections().len();
        assert!(
            connections.contains(&made),
            "close: {close}, {made} connections"
        );
    }
}

#[test]
fn faults_for_one_kind_of_request_leave_the_others_alone() {
    let b = Bench::new();
    let key = format!("/{}/blob", b.s3.bucket);
    let relay = b.relay(RelayConfig {
        faults: Faults {
            only: Some(RequestMatch {
                method: "GET".into(),
                target_contains: key,
            }),
            ..Faults::always(Fault::InternalError)
        },
        one_request_per_connection: true,
        ..RelayConfig::default()
    });
    // PUTs, relayed with the head the relay read to decide, byte for byte; the GET the fault is
    // set on, twice; one client throughout, whose connections each carry one request.
    let body =
        |seed: usize| -> Vec<u8> { (0..BLOB).map(|i| ((i * 7 + seed) % 251) as u8).collect() };
    assert!(b.put_body(&relay, "first", body(1)).is_success());
    for _ in 0..2 {
        let (status, _, _) = b.get(&relay).unwrap();
        assert_eq!(status.as_u16(), 500);
    }
    assert!(b.put_body(&relay, "second", body(2)).is_success());
    assert!(
        b.s3.get("first") == Some(body(1)),
        "first PUT changed in transit"
    );
    assert!(
        b.s3.get("second") == Some(body(2)),
        "second PUT changed in transit"
    );
    assert_eq!(relay.injected()[&Fault::InternalError], 2);
    let decided: Vec<_> = relay.connections().into_iter().map(|(_, f)| f).collect();
    assert_eq!(
        decided,
        [
            None,
            Some(Fault::InternalError),
            Some(Fault::InternalError),
            None
        ]
    );
    // The GETs alone: the requests the faults are for, without the PUTs around them.
    let matched: Vec<_> = relay.matched().into_iter().map(|(_, f)| f).collect();
    assert_eq!(
        matched,
        [Some(Fault::InternalError), Some(Fault::InternalError)]
    );
}
