//! Exit codes, and the one place where an error becomes a message.

use std::process::ExitCode;

use thiserror::Error;

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  the work was done but some of it failed (a path could not be published), or verify found
     problems in the cache
  2  nothing was done: bad arguments, configuration, keys or store URL, or no access";

/// An error that says which exit code it deserves. Anything else is a usage/configuration error.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct PartialFailure(pub String);

pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: "what we did: why it failed".
            eprintln!("nixpush: error: {e:#}");
            if e.downcast_ref::<PartialFailure>().is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
