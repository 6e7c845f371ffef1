//! Draining the durable queue into the cache, in the background: what `nixpush daemon` runs.
//!
//! - [`intake`]: the hook's socket; each request is committed to the queue before it is
//!   acknowledged, and only root, the daemon's user and `socket-group` may send one.
//! - [`worker`]: claims due items as they come (builds that finish together, together), runs an
//!   attempt for each at once, and records each item's outcome as soon as its attempt ends;
//!   imports what hooks spilled; keeps GC roots in step with the queue.
//! - [`item`]: one attempt at one item: resolve derivations to outputs, walk the closure up to
//!   what the cache is known to hold, publish it (see `nixpush_cache::Publisher`), decide.
//! - [`build_logs`]: the build logs of published outputs, uploaded after them.
//! - [`decide`]: the decisions, as pure functions (gone, retry, reconnect, failed, root cause).
//!
//! SIGTERM/SIGINT: stop accepting and claiming, let the attempts in hand finish for
//! `stop-timeout`, put the rest back in the queue, return. The hook meanwhile writes the queue
//! directly, so nothing built while the daemon is down is missed.

mod build_logs;
pub mod decide;
mod intake;
pub mod ipc;
mod item;
pub mod metrics;
mod source;
mod systemd;
mod worker;

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use nixpush_cache::StoreUrl;
use nixpush_format::SecretKey;
use nixpush_queue::{Queue, RetryPolicy};
use nixpush_store::{BuildLogs, GcRoots};
use tokio::runtime::Handle;
use tokio::sync::watch;

pub use source::StoreSource;

use intake::{Intake, Open, bind};
use worker::{Wake, Worker};

/// What the daemon needs to know, from the configuration and its flags.
pub struct Settings {
    pub url: StoreUrl,
    pub keys: Vec<SecretKey>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub socket_group: Option<String>,
    pub jobs: usize,
    pub skip_signed_by: Vec<String>,
    pub retry: RetryPolicy,
    /// The local store's address (`--store`), or `None` for `$NIX_REMOTE`, else auto.
    pub store: Option<String>,
    pub roots: Option<GcRoots>,
    pub roots_max: usize,
    /// Where Nix keeps build logs, when they are to be uploaded (`upload-logs`).
    pub build_logs: Option<BuildLogs>,
    pub spill_dir: PathBuf,
    /// Where to write the metrics for node_exporter's textfile collector.
    pub metrics_textfile: Option<PathBuf>,
    /// Where to serve the metrics over HTTP (`127.0.0.1:9464`, say).
    pub metrics_listen: Option<String>,
    /// How long a stop waits for the uploads in hand before putting them back in the queue.
    pub stop_timeout: std::time::Duration,
    /// How long finished items stay in the queue (for `status`) before they are pruned.
    pub keep_finished: std::time::Duration,
    /// How long the worker waits, once a hook has recorded a build, for others before claiming
    /// (see [`worker::Gathering`]).
    pub gather: std::time::Duration,
}

/// Serves the hook's socket and drains the queue until SIGTERM or SIGINT. The socket, and every
/// transaction on the queue, are served on `intake_on`, a runtime that builds can wait on (see
/// `nixpush daemon`); the rest on the caller's.
pub async fn serve(settings: Settings, queue: Queue, intake_on: Handle) -> Result<()> {
    // The socket is registered with the intake's runtime, which wakes for it alone.
    let (listener, peers) = {
        let _intake = intake_on.enter();
        bind(&settings.socket, settings.socket_group.as_deref())?
    };
    // Hook requests and the worker share one connection. With two, a hook's commit that met the
    // worker's write lock waited in SQLite's busy handler, which sleeps in steps of milliseconds;
    // the mutex hands over as soon as the worker's transaction ends.
    let queue = Arc::new(Mutex::new(queue));
    let wake = Arc::new(Wake::default());
    let intake = Intake {
        peers,
        queue: queue.clone(),
        wake: wake.clone(),
        open: Arc::new(Open::default()),
        spill_dir: settings.spill_dir.clone(),
    };
    let (stop_tx, stop) = watch::channel(false);
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Without them the daemon could not be stopped cleanly: refuse to start.
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("stopping");
            systemd::stopping();
            let _ = stop_tx.send(true);
        });
    }
    let acceptor = {
        let mut stop = stop.clone();
        intake_on.spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((conn, _)) => {
                            // Numbered as accepted, so that a barrier knows what came before it.
                            let ticket = intake.open.enter();
                            tokio::spawn(intake::handle(conn, ticket, intake.clone()));
                        }
                        Err(e) => tracing::warn!(error = %e, "accept failed"),
                    },
                    _ = stop.changed() => break,
                }
            }
        })
    };
    let metrics = Arc::new(metrics::Metrics::default());
    if let Some(addr) = &settings.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr} (metrics-listen)"))?;
        // The address as bound: with port 0, the one the kernel chose.
        if let Ok(bound) = listener.local_addr() {
            tracing::info!(addr = %bound, "serving metrics");
        }
        tokio::spawn(metrics::serve(listener, metrics.clone()));
    }
    systemd::ready();
    let mut worker = Worker::new(settings, queue, intake_on.clone(), metrics);
    worker.run(wake, stop).await;
    let _ = acceptor.await;
    let _ = fs::remove_file(&worker.settings.socket);
    tracing::info!("stopped");
    Ok(())
}
