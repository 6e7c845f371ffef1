//! `nixpush generate`: shell completions and man pages made from the command-line definitions, so
//! they never disagree with `--help`. For installers and packagers (`scripts/install.sh`), hence
//! hidden from `--help`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, ValueEnum};
use clap_complete::Shell;

#[derive(clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    what: What,
    /// With `man`: the directory to write `nixpush.1` and one page per command into.
    #[arg(long, required_if_eq("what", "man"))]
    dir: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    /// bash completions, on stdout.
    CompleteBash,
    /// zsh completions, on stdout.
    CompleteZsh,
    /// fish completions, on stdout.
    CompleteFish,
    /// Man pages, into --dir.
    Man,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cmd = crate::Cli::command();
    let shell = match args.what {
        What::CompleteBash => Shell::Bash,
        What::CompleteZsh => Shell::Zsh,
        What::CompleteFish => Shell::Fish,
        What::Man => {
            let dir = args.dir.expect("clap requires --dir with man");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            return clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()));
        }
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "nixpush", &mut out);
    std::io::stdout()
        .write_all(&out)
        .context("cannot write the completions to stdout")
}
