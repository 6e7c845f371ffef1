//! `nixpush verify`: audit a binary cache the way a careful client would.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use nixpush_cache::{Scope, StoreUrl, Verifier, VerifyEvent, VerifySummary};
use nixpush_format::PublicKey;
use serde_json::json;

use crate::exit::PartialFailure;
use crate::paths;
use crate::report::{Progress, human_bytes};

/// Audit a binary cache: signatures, NAR hashes, closure completeness
#[derive(clap::Args)]
#[command(after_help = "\
Exit codes:
  0  every check passed
  1  problems were found (one line each on stdout)
  2  the audit could not run, or some objects could not be read: bad URL or key, no access")]
pub struct Args {
    /// The cache: s3://BUCKET?…, file:///DIR, or http(s)://HOST (read anonymously)
    #[arg(long, value_name = "STORE_URL")]
    store: String,
    /// A key that may sign narinfos, as in nix.conf's trusted-public-keys (`name:base64`; several
    /// may be given space-separated), or a file holding one (repeatable)
    #[arg(long = "trusted-public-key", value_name = "KEY", required = true)]
    trusted_public_keys: Vec<String>,
    /// Check every narinfo in the cache; also report NAR objects no narinfo points to and
    /// unfinished uploads (nothing is deleted)
    #[arg(long, conflicts_with = "paths")]
    all: bool,
    /// Store paths or symlinks into the store (./result) whose closures to check
    #[arg(value_name = "PATH", required_unless_present = "all")]
    paths: Vec<String>,
    /// Paths missing from the cache are expected when the local store (NIX_REMOTE, else the
    /// daemon) has them signed by this key: `push --skip-signed-by` left them to that key's cache
    /// (repeatable)
    #[arg(long = "skip-signed-by", value_name = "KEY_NAME")]
    skip_signed_by: Vec<String>,
    /// Narinfos checked at once [default: 8]
    #[arg(long, short = 'j', value_name = "N", value_parser = crate::config::parse_jobs)]
    jobs: Option<usize>,
    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,
}

/// Enough to hide round-trip latency on small narinfos; NAR checks are CPU-bound beyond that.
const DEFAULT_JOBS: usize = 8;

/// Parses `--trusted-public-key` values: keys (several per value, as nix.conf writes them) or files.
fn trusted_keys(values: &[String]) -> Result<Vec<PublicKey>> {
    let mut keys = Vec::new();
    for value in values {
        for token in value.split_whitespace() {
            let key = match token.parse::<PublicKey>() {
                Ok(k) => k,
                Err(_) if Path::new(token).is_file() => {
                    let text = std::fs::read_to_string(token)
                        .with_context(|| format!("cannot read public key file {token}"))?;
                    text.parse()
                        .with_context(|| format!("public key file {token}"))?
                }
                Err(e) => {
                    return Err(anyhow!(e).context(format!(
                        "--trusted-public-key {token:?} is neither a public key nor a file"
                    )));
                }
            };
            keys.push(key);
        }
    }
    if keys.is_empty() {
        bail!("--trusted-public-key: no key given");
    }
    Ok(keys)
}

/// For `--skip-signed-by`: a path is missing on purpose when the local store has it signed by one
/// of the named keys.
fn upstream_check(skip: &[String]) -> Result<Option<nixpush_cache::Upstream>> {
    if skip.is_empty() {
        return Ok(None);
    }
    let address = nixpush_store::StoreAddress::resolve(None)?;
    let store = nixpush_store::Store::open(address)
        .context("--skip-signed-by asks the local store which paths upstream keys signed")?;
    let skip = skip.to_vec();
    Ok(Some(Box::new(move |path| {
        let info = store.path_info(path).ok()?;
        let key = info
            .sigs
            .iter()
            .find(|s| skip.iter().any(|k| k == s.key_name()))?;
        Some(format!("signed by {}", key.key_name()))
    })))
}

pub fn run(args: Args) -> Result<()> {
    let url: StoreUrl = args.store.parse()?;
    let trusted = trusted_keys(&args.trusted_public_keys)?;
    let scope = if args.all {
        Scope::All
    } else {
        Scope::Closures(
            args.paths
                .iter()
                .map(|p| paths::store_path_of(p))
                .collect::<Result<_>>()?,
        )
    };
    let jobs = args.jobs.unwrap_or(DEFAULT_JOBS);
    let target = url.display_base();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let show = Show::new(Progress::detect(args.json), args.json);
    let started = Instant::now();
    let upstream = upstream_check(&args.skip_signed_by)?;
    let summary = runtime.block_on(async {
        let mut verifier = Verifier::open(&url, trusted)
            .await
            .with_context(|| format!("cannot open cache {target}"))?;
        if let Some(upstream) = upstream {
            verifier = verifier.with_upstream(upstream);
        }
        verifier
            .run(scope, jobs, &|e| show.event(e))
            .await
            .with_context(|| format!("cannot verify {target}"))
    })?;
    let elapsed = started.elapsed();
    show.finish(&target, &summary, elapsed);
    if args.json {
        let problems: Vec<_> = summary
            .findings
            .iter()
            .map(|f| {
                json!({
                    "subject": f.subject.to_string(),
                    "kind": f.problem.kind(),
                    "message": f.problem.to_string(),
                })
            })
            .collect();
        let report = json!({
            "store": target,
            "narinfos": summary.narinfos,
            "nars": summary.nars,
            "file_bytes": summary.file_bytes,
            "nar_bytes": summary.nar_bytes,
            "signed_by": summary.signed_by,
            "upstream": summary.upstream,
            "problems": problems,
            "seconds": elapsed.as_secs_f64(),
        });
        println!("{report}");
    }
    match (summary.defects(), summary.unchecked()) {
        (0, 0) => Ok(()),
        (0, n) => bail!("{n} objects in {target} could not be read; the audit is incomplete"),
        (n, _) => Err(PartialFailure(format!("{n} problems found in {target}")).into()),
    }
}

/// What the user sees while the audit runs.
struct Show {
    bar: Option<ProgressBar>,
    json: bool,
}

impl Show {
    fn new(mode: Progress, json: bool) -> Self {
        let bar = (mode == Progress::Bar).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} narinfos {msg}",
                )
                .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Show { bar, json }
    }

    /// Problems go to stdout, one line each, so they can be piped; everything else to stderr.
    fn problem_line(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn note(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn event(&self, e: VerifyEvent) {
        match e {
            VerifyEvent::Queued(n) => {
                if let Some(bar) = &self.bar {
                    bar.inc_length(n);
                }
            }
            VerifyEvent::Checked { subject, .. } => {
                if let Some(bar) = &self.bar {
                    bar.inc(1);
                    bar.set_message(subject.to_string());
                }
            }
            VerifyEvent::Problem(f) => {
                if !self.json {
                    self.problem_line(f.to_string());
                }
            }
            VerifyEvent::Note(n) => self.note(format!("note: {n}")),
        }
    }

    fn finish(&self, target: &str, s: &VerifySummary, elapsed: Duration) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let outcome = match (s.defects(), s.unchecked()) {
            (0, 0) => "no problems".to_owned(),
            (d, 0) => format!("{d} problems"),
            (d, u) => format!("{d} problems, {u} objects could not be read"),
        };
        let keys = if s.signed_by.is_empty() {
            "no narinfo signed by a trusted key".to_owned()
        } else {
            let by: Vec<String> = s
                .signed_by
                .iter()
                .map(|(k, n)| format!("{k} ({n})"))
                .collect();
            format!("signed by {}", by.join(", "))
        };
        let upstream = if s.upstream.is_empty() {
            String::new()
        } else {
            let by: Vec<String> = s
                .upstream
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect();
            format!("; left to upstream caches: {}", by.join(", "))
        };
        eprintln!(
            "verified {} narinfos and {} NARs ({} stored, {} unpacked) in {target} in {:.2} s: {outcome}; {keys}{upstream}",
            s.narinfos,
            s.nars,
            human_bytes(s.file_bytes),
            human_bytes(s.nar_bytes),
            elapsed.as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixpush_format::SecretKey;

    #[test]
    fn trusted_keys_come_as_nix_conf_writes_them_or_from_files() {
        let a = SecretKey::generate("a-1").unwrap().public_key();
        let b = SecretKey::generate("b-1").unwrap().public_key();
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("b.pub");
        std::fs::write(&file, format!("{b}\n")).unwrap();
        let keys = trusted_keys(&[format!("{a} {b}"), file.to_str().unwrap().to_owned()]).unwrap();
        assert_eq!(keys, vec![a, b.clone(), b]);

        let e = format!("{:#}", trusted_keys(&["nokey".into()]).unwrap_err());
        assert!(e.contains("\"nokey\"") && e.contains("neither"), "{e}");
        let e = format!("{:#}", trusted_keys(&[" ".into()]).unwrap_err());
        assert!(e.contains("no key"), "{e}");
    }
}
