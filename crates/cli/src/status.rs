//! `nixpush status`: the queue, read without the daemon.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nixpush_queue::{Queue, State};
use serde_json::json;

use crate::config::Config;

/// Show what is queued, in flight, failed (and why) and done
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Queue directory (overrides `state-dir`)
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Print JSON on stdout
    #[arg(long)]
    json: bool,
    /// List every failed item with its reason (not only the most recent errors)
    #[arg(long)]
    failed: bool,
    /// For monitoring: exit 1 when items failed or the oldest pending item is older than
    /// --max-age (exit 2 when the queue cannot be read)
    #[arg(long)]
    check: bool,
    /// With --check: how old the oldest pending item may be, as `90s`, `30m`, `2h` [default: 1h]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "check")]
    max_age: Option<Duration>,
}

/// `status --check`'s default bound on the oldest pending item's age.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);

pub fn human_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

pub(crate) fn open(state_dir: Option<PathBuf>) -> Result<Queue> {
    let dir = match state_dir {
        Some(d) => d,
        None => Config::load()?.state_dir(),
    };
    if !dir.join("queue.sqlite").exists() {
        bail!(
            "no queue in {} (has nixpush-hook or the daemon run with this state directory?)",
            dir.display()
        );
    }
    Queue::open(&dir).with_context(|| format!("cannot open the queue in {}", dir.display()))
}

pub fn status(args: StatusArgs) -> Result<()> {
    let q = open(args.state_dir.clone())?;
    let s = q.status(10)?;
    let failed = if args.failed || args.check {
        q.failed()?
    } else {
        Vec::new()
    };
    // Builds the hook could only record in the spill directory (the queue had no room).
    let spill_dir = Config::load().unwrap_or_default().spill_dir();
    let spilled = nixpush_queue::spill::pending(&spill_dir)
        .map(|f| f.len())
        .unwrap_or(0);
    let now = nixpush_queue::now_ms();
    let age = s
        .oldest_pending
        .map(|t| Duration::from_millis((now - t).max(0) as u64));
    if args.json {
        let counts: serde_json::Map<String, serde_json::Value> = s
            .counts
            .iter()
            .map(|(st, n)| (st.as_str().to_owned(), json!(n)))
            .collect();
        let errors: Vec<_> = s
            .recent_errors
            .iter()
            .map(|(item, st, attempts, err, at)| {
                json!({"item": item, "state": st.as_str(), "attempts": attempts, "error": err, "at_ms": at})
            })
            .collect();
        let report = json!({
            "queue": q.path(),
            "counts": counts,
            "oldest_pending_seconds": age.map(|a| a.as_secs()),
            "spilled_files": spilled,
            "failed": failed.iter().map(|(item, attempts, error, at)| {
                json!({"item": item, "attempts": attempts, "error": error, "at_ms": at})
            }).collect::<Vec<_>>(),
            "recent_errors": errors,
        });
        println!("{report}");
        return check(&args, &failed, age);
    }
    println!("queue: {}", q.path().display());
    let counts: Vec<String> = s
        .counts
        .iter()
        .map(|(st, n)| format!("{} {n}", st.as_str().replace('_', " ")))
        .collect();
    println!("  {}", counts.join(", "));
    match age {
        Some(a) => println!("  oldest pending: {} ago", human_duration(a)),
        None => println!("  nothing pending"),
    }
    if spilled > 0 {
        println!(
            "  {spilled} hook records in {} wait for room in the queue",
            spill_dir.display()
        );
    }
    if !s.recent_errors.is_empty() {
        println!("recent errors:");
        for (item, st, attempts, err, _) in &s.recent_errors {
            let what = match st {
                State::Failed => format!("failed after {attempts} attempts"),
                State::Gone => "gone".to_owned(),
                _ => format!("retrying ({attempts} attempts so far)"),
            };
            println!("  {item}: {what}: {err}");
        }
    }
    if args.failed {
        println!("failed items ({}):", failed.len());
        for (item, attempts, error, _) in &failed {
            println!("  {item} (after {attempts} attempts): {error}");
        }
    }
    check(&args, &failed, age)
}

/// `--check`: a problem is an error with exit code 1, for monitoring systems.
fn check(
    args: &StatusArgs,
    failed: &[(String, u32, String, i64)],
    age: Option<Duration>,
) -> Result<()> {
    if !args.check {
        return Ok(());
    }
    let max_age = args.max_age.unwrap_or(DEFAULT_MAX_AGE);
    let mut problems = Vec::new();
    if !failed.is_empty() {
        problems.push(format!(
            "{} items failed (nixpush status --failed; nixpush retry)",
            failed.len()
        ));
    }
    if let Some(a) = age.filter(|a| *a > max_age) {
        problems.push(format!(
            "the oldest pending item is {} old, more than {}",
            human_duration(a),
            humantime::format_duration(max_age)
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(crate::exit::PartialFailure(problems.join("; ")).into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_well() {
        use std::time::Duration;
        assert_eq!(super::human_duration(Duration::from_secs(5)), "5s");
        assert_eq!(
            super::human_duration(Duration::from_millis(312_400)),
            "5m 12s"
        );
        assert_eq!(
            super::human_duration(Duration::from_secs(90061)),
            "1day 1h 1m 1s"
        );
    }
}
