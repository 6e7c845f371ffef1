//! A collection's figures in Prometheus's text format, for node_exporter's textfile collector
//! (`nixpush gc --metrics-textfile`), beside the daemon's.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::collect::Report;

type Labels = Vec<(&'static str, &'static str)>;

/// The figures of a run that ended at `now_s` (Unix seconds): `report` when it ran to its end,
/// `None` when it stopped (only the failure and the time are known).
pub fn render(report: Option<&Report>, now_s: f64) -> String {
    let mut registry = Registry::default();
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(value);
        registry.register(name, help, g);
    };
    gauge(
        &mut registry,
        "nixpush_gc_last_run_timestamp_seconds",
        "When the last collection ended (Unix time)",
        now_s,
    );
    gauge(
        &mut registry,
        "nixpush_gc_last_run_success",
        "1 if the last collection ran to its end, 0 if it stopped",
        f64::from(u8::from(report.is_some())),
    );
    if let Some(r) = report {
        gauge(
            &mut registry,
            "nixpush_gc_duration_seconds",
            "How long the last collection took",
            r.seconds,
        );
        gauge(
            &mut registry,
            "nixpush_gc_narinfos",
            "Narinfos in the cache when the last collection marked",
            r.narinfos as f64,
        );
        gauge(
            &mut registry,
            "nixpush_gc_live_narinfos",
            "Narinfos some root needed",
            r.live as f64,
        );
        gauge(
            &mut registry,
            "nixpush_gc_nars_in_grace",
            "NARs no narinfo needs, waiting out the NAR grace",
            r.nars_in_grace as f64,
        );
        let deleted = Family::<Labels, Gauge>::default();
        registry.register(
            "nixpush_gc_deleted",
            "Objects the last collection deleted, by kind",
            deleted.clone(),
        );
        for (kind, n) in [
            ("narinfo", r.deleted_narinfos),
            ("nar", r.deleted_nars),
            ("log", r.deleted_logs),
            ("session", r.deleted_sessions),
        ] {
            deleted
                .get_or_create(&vec![("kind", kind)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_and_a_stop_are_told_apart() {
        let report = Report {
            deleted_narinfos: 2,
            live: 4,
            ..Report::default()
        };
        let text = render(Some(&report), 1000.0);
        for line in [
            "nixpush_gc_last_run_success 1.0",
            "nixpush_gc_deleted{kind=\"narinfo\"} 2",
            "nixpush_gc_live_narinfos 4.0",
            "nixpush_gc_last_run_timestamp_seconds 1000.0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let stopped = render(None, 5.0);
        assert!(
            stopped
                .lines()
                .any(|l| l == "nixpush_gc_last_run_success 0.0")
        );
        assert!(!stopped.contains("nixpush_gc_deleted"));
    }
}
