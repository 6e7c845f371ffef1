//! What the daemon is doing, in Prometheus's text format: written atomically to a file for
//! node_exporter's textfile collector (`metrics-textfile`) and served over HTTP on a local address
//! (`metrics-listen`), for operators who no longer see a stuck upload as a failed build.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use nixpush_queue::Status;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    items: Family<Labels, Gauge>,
    oldest_pending: Gauge<f64, std::sync::atomic::AtomicU64>,
    lag: Histogram,
    uploaded_bytes: Counter,
    logs_uploaded: Counter,
    logs_skipped: Counter,
    retries: Family<Labels, Counter>,
    fallbacks: Family<Vec<(&'static str, String)>, Gauge>,
    s3_requests: Family<Vec<(&'static str, String)>, Counter>,
    last_publish: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Serialises writers of the text file.
    write: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let items = Family::<Labels, Gauge>::default();
        registry.register("nixpush_queue_items", "Queue items by state", items.clone());
        let oldest_pending = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "nixpush_queue_oldest_pending_seconds",
            "Age of the oldest queued or in-flight item (0 when none)",
            oldest_pending.clone(),
        );
        // 0.1 s to about 1.9 days.
        let lag = Histogram::new(exponential_buckets(0.1, 2.0, 21));
        registry.register(
            "nixpush_publish_lag_seconds",
            "From an item's enqueue to its narinfo acknowledged (or found present)",
            lag.clone(),
        );
        let uploaded_bytes = Counter::default();
        registry.register(
            "nixpush_uploaded_bytes",
            "Compressed NAR bytes uploaded",
            uploaded_bytes.clone(),
        );
        let logs_uploaded = Counter::default();
        registry.register(
            "nixpush_build_logs_uploaded",
            "Build logs uploaded (log/<drv>)",
            logs_uploaded.clone(),
        );
        let logs_skipped = Counter::default();
        registry.register(
            "nixpush_build_logs_skipped",
            "Build logs Nix kept that were not uploaded: unreadable, too long, or refused by the cache (see the daemon's log)",
            logs_skipped.clone(),
        );
        let retries = Family::<Labels, Counter>::default();
        registry.register(
            "nixpush_retries",
            "Failed attempts that will be retried, by class (throttle, network, auth, server, corrupt, store, other)",
            retries.clone(),
        );
        let fallbacks = Family::<Vec<(&'static str, String)>, Gauge>::default();
        registry.register(
            "nixpush_hook_fallback_items",
            "Items the hook recorded without the daemon: via=queue (it wrote the queue itself), via=spill (in the spill directory)",
            fallbacks.clone(),
        );
        let s3_requests = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "nixpush_s3_requests",
            "S3 request attempts (retries included) by operation and outcome (2xx to 5xx, or error when no answer came)",
            s3_requests.clone(),
        );
        let last_publish = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "nixpush_last_publish_timestamp_seconds",
            "Unix time of the last item published (0 before the first)",
            last_publish.clone(),
        );
        Metrics {
            registry,
            items,
            oldest_pending,
            lag,
            uploaded_bytes,
            logs_uploaded,
            logs_skipped,
            retries,
            fallbacks,
            s3_requests,
            last_publish,
            write: Mutex::new(()),
        }
    }
}

impl Metrics {
    /// The queue's counts and oldest pending item, as `status` reads them; `now_ms` is Unix ms.
    pub fn set_queue(&self, status: &Status, now_ms: i64) {
        for (state, n) in &status.counts {
            self.items
                .get_or_create(&vec![("state", state.as_str())])
                .set(*n as i64);
        }
        let age = status
            .oldest_pending
            .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
        self.oldest_pending.set(age);
    }

    /// How many items each of the hook's fallbacks recorded, as the queue counts them.
    pub fn set_fallbacks(&self, counts: &[(String, u64)]) {
        for (via, n) in counts {
            self.fallbacks
                .get_or_create(&vec![("via", via.clone())])
                .set(*n as i64);
        }
    }

    /// An item published `lag` after it was queued, at Unix time `now_ms`.
    pub fn published(&self, lag: Duration, now_ms: i64) {
        self.lag.observe(lag.as_secs_f64());
        self.last_publish.set(now_ms as f64 / 1000.0);
    }

    pub fn uploaded(&self, bytes: u64) {
        self.uploaded_bytes.inc_by(bytes);
    }

    pub fn log_uploaded(&self) {
        self.logs_uploaded.inc();
    }

    pub fn log_skipped(&self) {
        self.logs_skipped.inc();
    }

    pub fn retried(&self, class: &'static str) {
        self.retries.get_or_create(&vec![("class", class)]).inc();
    }

    pub fn s3_request(&self, operation: &str, outcome: &str) {
        self.s3_requests
            .get_or_create(&vec![
                ("operation", operation.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Writes the metrics to `path` through a temporary file renamed over it, so the collector never
    /// reads half a file.
    pub fn write_file(&self, path: &Path) -> std::io::Result<()> {
        let _one_writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = path.with_extension("prom.tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, path)
    }
}

/// Serves the metrics over HTTP on `listener`: any request gets them.
pub async fn serve(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // The request's head, read with a deadline and a bound; its contents do not matter.
            let mut head = Vec::new();
            let read = async {
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            };
            if !tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .unwrap_or(false)
            {
                return;
            }
            let body = metrics.render();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixpush_queue::State;

    #[test]
    fn the_text_names_each_metric_with_its_labels() {
        let m = Metrics::default();
        m.set_queue(
            &Status {
                counts: vec![(State::Done, 3), (State::Failed, 1)],
                oldest_pending: Some(1_000),
                recent_errors: vec![],
            },
            11_000,
        );
        m.uploaded(1234);
        m.log_uploaded();
        m.retried("throttle");
        m.s3_request("PutObject", "2xx");
        m.published(Duration::from_millis(250), 5_000);
        let text = m.render();
        for line in [
            "nixpush_queue_items{state=\"done\"} 3",
            "nixpush_queue_items{state=\"failed\"} 1",
            "nixpush_queue_oldest_pending_seconds 10.0",
            "nixpush_uploaded_bytes_total 1234",
            "nixpush_build_logs_uploaded_total 1",
            "nixpush_retries_total{class=\"throttle\"} 1",
            "nixpush_s3_requests_total{operation=\"PutObject\",outcome=\"2xx\"} 1",
            "nixpush_publish_lag_seconds_count 1",
            "nixpush_last_publish_timestamp_seconds 5.0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
