//! The test bed's relay as a program, for the benchmark scripts:
//! `nixpush-relay UPSTREAM [--delay-ms N] [--upstream-mb-per-sec X]`. Prints its `http://127.0.0.1:PORT`
//! endpoint on the first line of stdout, then relays until killed.

use std::io::Write;
use std::time::Duration;

use nixpush_testbed::{Relay, RelayConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut upstream = None;
    let mut config = RelayConfig::default();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> f64 {
            let v = args
                .next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")));
            v.parse()
                .unwrap_or_else(|_| fail(&format!("{name}: `{v}` is not a number")))
        };
        match arg.as_str() {
            "--delay-ms" => config.delay = Duration::from_secs_f64(value("--delay-ms") / 1000.0),
            "--upstream-mb-per-sec" => {
                let mb = value("--upstream-mb-per-sec");
                if mb <= 0.0 {
                    fail("--upstream-mb-per-sec must be more than 0");
                }
                config.upstream_bytes_per_sec = Some((mb * 1e6) as u64)
            }
            _ if upstream.is_none() && !arg.starts_with('-') => upstream = Some(arg),
            _ => fail(&format!("unexpected argument `{arg}`")),
        }
    }
    let upstream = upstream.unwrap_or_else(|| fail("no UPSTREAM (host:port or http://host:port)"));
    let relay = Relay::start(&upstream, config);
    println!("{}", relay.endpoint);
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::park();
    }
}

fn fail(message: &str) -> ! {
    eprintln!(
        "nixpush-relay: {message}\nusage: nixpush-relay UPSTREAM [--delay-ms N] [--upstream-mb-per-sec X]"
    );
    std::process::exit(2)
}
