//! Turns push events into what the user sees: a progress bar on a terminal, one line per path
//! otherwise, and a summary.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use nixpush_cache::{Event, PushSummary};

/// How progress is shown. Decided from facts passed in, so the decision is testable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A live bar (interactive terminals only).
    Bar,
    /// One line per path on stderr (logs, CI, pipes).
    Lines,
}

impl Progress {
    pub fn choose(stderr_is_terminal: bool, in_ci: bool, json: bool) -> Self {
        if stderr_is_terminal && !in_ci && !json {
            Progress::Bar
        } else {
            Progress::Lines
        }
    }

    pub fn detect(json: bool) -> Self {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
        Self::choose(std::io::stderr().is_terminal(), ci, json)
    }
}

pub fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

pub struct Reporter {
    bar: Option<ProgressBar>,
    compression: String,
}

impl Reporter {
    pub fn new(mode: Progress, compression: &str) -> Self {
        let bar = (mode == Progress::Bar).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} paths {msg}",
                )
                .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Reporter {
            bar,
            compression: compression.to_owned(),
        }
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(bar) => bar.println(s),
            None => eprintln!("{s}"),
        }
    }

    pub fn event(&self, e: Event) {
        match e {
            Event::Planned {
                upload,
                present,
                skipped,
                nar_bytes,
            } => {
                if let Some(bar) = &self.bar {
                    bar.set_length(upload as u64);
                } else {
                    self.line(format!(
                        "{upload} paths to upload ({} of NAR), {present} already in the cache, {skipped} skipped",
                        human_bytes(nar_bytes)
                    ));
                }
            }
            Event::AlreadyPresent { path } => {
                if self.bar.is_none() {
                    self.line(format!("present  {path}"));
                }
            }
            Event::Skipped { path, key } => {
                if self.bar.is_none() {
                    self.line(format!("skipped  {path} (signed by {key})"));
                }
            }
            Event::Uploaded {
                path,
                nar_size,
                file_size,
                nar_existed,
            } => match &self.bar {
                Some(bar) => {
                    bar.inc(1);
                    bar.set_message(path.name().to_owned());
                }
                None => {
                    let nar = if nar_existed {
                        ", NAR already there"
                    } else {
                        ""
                    };
                    self.line(format!(
                        "uploaded {path} ({} NAR, {} {}{nar})",
                        human_bytes(nar_size),
                        human_bytes(file_size),
                        self.compression
                    ))
                }
            },
            Event::Failed { path, error } => {
                if let Some(bar) = &self.bar {
                    bar.inc(1);
                }
                self.line(format!("FAILED   {path}: {error}"));
            }
        }
    }

    /// The push was stopped by a signal: clear the bar, so the message that follows stands alone.
    pub fn interrupted(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    pub fn finish(&self, target: &str, summary: &PushSummary, elapsed: Duration) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let total = summary.uploaded.len()
            + summary.present.len()
            + summary.skipped.len()
            + summary.failed.len();
        let secs = elapsed.as_secs_f64();
        if summary.uploaded.is_empty() && summary.failed.is_empty() {
            eprintln!(
                "nothing to upload: all {total} paths are already in {target} ({} present, {} skipped) [{secs:.2} s]",
                summary.present.len(),
                summary.skipped.len()
            );
            return;
        }
        let rate = summary.nar_bytes as f64 / secs.max(1e-3);
        eprintln!(
            "{total} paths for {target} in {secs:.2} s: {} uploaded ({} NAR -> {} {}, {}/s), {} already present, \
             {} skipped, {} failed",
            summary.uploaded.len(),
            human_bytes(summary.nar_bytes),
            human_bytes(summary.file_bytes),
            self.compression,
            human_bytes(rate as u64),
            summary.present.len(),
            summary.skipped.len(),
            summary.failed.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_only_on_an_interactive_terminal() {
        assert_eq!(Progress::choose(true, false, false), Progress::Bar);
        assert_eq!(Progress::choose(false, false, false), Progress::Lines);
        assert_eq!(
            Progress::choose(true, true, false),
            Progress::Lines,
            "CI logs get lines"
        );
        assert_eq!(
            Progress::choose(true, false, true),
            Progress::Lines,
            "JSON mode stays parseable"
        );
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(100 * 1024 * 1024), "100.00 MiB");
    }
}
