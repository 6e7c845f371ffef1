//! The `nixpush` binary: commands, configuration, logging and progress, wired onto the crates that
//! do the work. Errors reach the user in exactly one place, [`exit`].

pub mod exit;
mod keygen;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nixpush",
    version,
    about = "Upload Nix builds to an S3 (or file) binary cache, safely",
    after_help = exit::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Keygen(keygen::Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(args) => keygen::run(args),
    };
    exit::report(result)
}
