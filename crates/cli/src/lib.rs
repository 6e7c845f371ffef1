//! The `nixpush` binary: commands, configuration, logging and progress, wired onto the crates that
//! do the work. Errors reach the user in exactly one place, [`exit`].

mod build_logs;
mod config;
mod daemon;
mod enqueue;
pub mod exit;
mod gc;
mod generate;
pub mod hook;
mod keygen;
mod paths;
mod push;
mod record;
mod report;
mod retry;
mod status;
mod verify;
mod wait;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `nixpush --version`: the version and the commit it was built from (see build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("NIXPUSH_COMMIT"), ")");

#[derive(Parser)]
#[command(
    name = "nixpush",
    version = VERSION,
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
    Push(push::Args),
    Daemon(daemon::Args),
    Status(status::StatusArgs),
    Retry(retry::RetryArgs),
    Verify(verify::Args),
    Wait(wait::WaitArgs),
    Enqueue(enqueue::EnqueueArgs),
    Mark(wait::MarkArgs),
    Gc(gc::GcArgs),
    Pin(gc::PinArgs),
    Unpin(gc::UnpinArgs),
    Pins(gc::PinsArgs),
    #[command(hide = true)]
    Generate(generate::Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon's log is its record of what it uploaded; commands log only problems.
    let default_level = if matches!(cli.command, Command::Daemon(_)) {
        "info"
    } else {
        "warn"
    };
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIXPUSH_LOG")
                .unwrap_or_else(|_| default_level.into()),
        );
    // JSON lines on request, for log pipelines that parse fields rather than text.
    match std::env::var("NIXPUSH_LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().with_ansi(false).init(),
        format => {
            // Logs often go to journald or a CI log, where escape codes are noise.
            logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            if let Ok(other) = format
                && other != "text"
            {
                tracing::warn!(
                    "NIXPUSH_LOG_FORMAT={other:?} is neither `json` nor `text`; logging text"
                );
            }
        }
    }
    let result = match cli.command {
        Command::Keygen(args) => keygen::run(args),
        Command::Push(args) => push::run(args),
        Command::Daemon(args) => daemon::run(args),
        Command::Status(args) => status::status(args),
        Command::Retry(args) => retry::retry(args),
        Command::Verify(args) => verify::run(args),
        Command::Wait(args) => wait::wait(args),
        Command::Enqueue(args) => enqueue::enqueue(args),
        Command::Mark(args) => wait::mark(args),
        Command::Gc(args) => gc::gc(args),
        Command::Pin(args) => gc::pin(args),
        Command::Unpin(args) => gc::unpin(args),
        Command::Pins(args) => gc::list(args),
        Command::Generate(args) => generate::run(args),
    };
    exit::report(result)
}
