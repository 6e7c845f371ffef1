//! `nixpush push`: upload closures now, in the foreground.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use nixpush_cache::{Cache, NarSource, PushOptions, SourceError, StoreUrl};
use nixpush_format::{SecretKey, StorePath};
use nixpush_store::{Store, StoreAddress};
use serde_json::json;

use crate::exit::PartialFailure;
use crate::paths;
use crate::report::{Progress, Reporter};

/// Upload the closures of store paths to a binary cache, now
#[derive(clap::Args)]
pub struct Args {
    /// Binary cache URL in Nix's syntax: s3://BUCKET?region=…&endpoint=…&compression=… or file:///DIR
    #[arg(long, value_name = "STORE_URL")]
    to: String,
    /// Store paths, symlinks into the store (./result), or .drv files (their outputs are pushed)
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<String>,
    /// Sign narinfos with this secret key (repeatable; adds to the URL's secret-key=)
    #[arg(long = "secret-key-file", value_name = "FILE")]
    secret_key_files: Vec<PathBuf>,
    /// Paths prepared and uploaded at once [default: 16]
    #[arg(long, short = 'j', value_name = "N", value_parser = crate::config::parse_jobs)]
    jobs: Option<usize>,
    /// Do not upload paths signed by this key, e.g. cache.nixos.org-1 (repeatable)
    #[arg(long, value_name = "KEYNAME")]
    skip_signed_by: Vec<String>,
    /// The local store: `daemon`, `unix://SOCKET`, `local` or `auto` [default: $NIX_REMOTE, else auto]
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Print a JSON summary on stdout
    #[arg(long)]
    json: bool,
}

/// Most paths are small and their time is round trips to the cache, not CPU: many at once.
pub const DEFAULT_JOBS: usize = 16;

/// Reads secret key files; errors name the file and what is wrong, never the key.
pub fn load_keys(files: &[PathBuf]) -> Result<Vec<SecretKey>> {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read secret key file {}", f.display()))?;
            text.parse::<SecretKey>()
                .with_context(|| format!("secret key file {}", f.display()))
        })
        .collect()
}

pub struct StoreSource(pub Arc<Store>);

impl NarSource for StoreSource {
    fn write_nar(&self, path: &StorePath, out: &mut dyn std::io::Write) -> Result<(), SourceError> {
        self.0.nar(path, out).map(drop).map_err(Into::into)
    }
}

pub fn run(args: Args) -> Result<()> {
    let url: StoreUrl = args.to.parse()?;
    let mut key_files = url.secret_key_files.clone();
    key_files.extend(args.secret_key_files.iter().cloned());
    let keys = load_keys(&key_files)?;
    if keys.is_empty() {
        eprintln!(
            "warning: no signing key (--secret-key-file or secret-key=): paths are published with only \
             the signatures the store already has"
        );
    }
    let jobs = args.jobs.unwrap_or(DEFAULT_JOBS);
    let address = StoreAddress::resolve(args.store.as_deref())?;
    let store = Arc::new(Store::open(address).context("cannot open the Nix store")?);
    let mut roots = Vec::new();
    for arg in &args.paths {
        roots.extend(paths::resolve(arg, &store)?);
    }
    let started = Instant::now();
    let closure = store
        .closure(&roots, jobs)
        .context("cannot compute the closure")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let target = url.display_base();
    let reporter = Reporter::new(Progress::detect(args.json), url.compression.as_str());
    let summary = runtime.block_on(async {
        let cache = Cache::open(url)
            .await
            .with_context(|| format!("cannot open cache {target}"))?;
        let opts = PushOptions {
            jobs,
            keys,
            skip_signed_by: args.skip_signed_by,
            spool_dir: std::env::temp_dir(),
        };
        let source: Arc<dyn NarSource> = Arc::new(StoreSource(store));
        anyhow::Ok(
            cache
                .push(closure.into_values().collect(), source, &opts, &|e| {
                    reporter.event(e)
                })
                .await,
        )
    })?;
    let elapsed = started.elapsed();
    reporter.finish(&target, &summary, elapsed);
    if args.json {
        let names = |v: &[StorePath]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let report = json!({
            "uploaded": names(&summary.uploaded),
            "already_present": names(&summary.present),
            "skipped": names(&summary.skipped),
            "failed": summary.failed.iter().map(|(p, e)| json!({"path": p.to_string(), "error": nixpush_cache::error_chain(e)})).collect::<Vec<_>>(),
            "nar_bytes": summary.nar_bytes,
            "compressed_bytes": summary.file_bytes,
            "seconds": elapsed.as_secs_f64(),
        });
        println!("{report}");
    }
    if !summary.failed.is_empty() {
        let total = summary.uploaded.len()
            + summary.present.len()
            + summary.skipped.len()
            + summary.failed.len();
        return Err(PartialFailure(format!(
            "{} of {total} paths were not published",
            summary.failed.len()
        ))
        .into());
    }
    Ok(())
}
