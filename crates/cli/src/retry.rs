//! `nixpush retry`: failed items queued again, without the daemon.

use std::path::PathBuf;

use anyhow::Result;

use crate::status::open;

/// Queue failed items again
#[derive(clap::Args)]
pub struct RetryArgs {
    /// Queue directory (overrides `state-dir`)
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Every failed item
    #[arg(long, conflicts_with = "paths")]
    all: bool,
    /// The failed items to retry (store paths or .drv paths, as `status` shows them)
    #[arg(value_name = "PATH", required_unless_present = "all")]
    paths: Vec<String>,
}

/// Whole seconds, the largest units first ("5m 12s"), as an age is read.
pub fn retry(args: RetryArgs) -> Result<()> {
    let mut q = open(args.state_dir)?;
    let names = (!args.all).then_some(args.paths.as_slice());
    let n = q.retry_failed(names)?;
    println!("{n} failed items queued again");
    Ok(())
}
