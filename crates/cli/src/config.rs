//! The one configuration file, shared by the daemon, the hook, `status` and `retry`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nixpush_queue::RetryPolicy;
use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/nixpush/nixpush.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nixpush";
pub const DEFAULT_SOCKET: &str = "/run/nixpush/hook.sock";
pub const DEFAULT_SPILL_DIR: &str = "/run/nixpush/spill";
pub const DEFAULT_GC_ROOTS_DIR: &str = "/nix/var/nix/gcroots/nixpush";
pub const DEFAULT_GC_ROOTS_MAX: usize = 10_000;
/// How long a stopping daemon waits for the uploads in hand (below the unit's TimeoutStopSec).
pub const DEFAULT_STOP_TIMEOUT: f64 = 60.0;
/// How long finished items stay in the queue: a week of `status` history.
pub const DEFAULT_KEEP_FINISHED: f64 = 7.0 * 86400.0;
/// How long the daemon gathers the builds that finish together before uploading them: a tenth of a
/// second adds as much to each build's publish lag, and lets a run of short builds share requests.
pub const DEFAULT_GATHER: f64 = 0.1;
/// Past a minute, gathering is only delay.
const MAX_GATHER: f64 = 60.0;

/// More concurrent paths than this is a typo, not a plan: each one holds a connection, buffers and
/// a share of the compression threads.
pub const MAX_JOBS: usize = 1024;
/// About 300 years: "never" in practice, and far below what `Duration` holds (1e30 panicked).
const MAX_SECONDS: f64 = 1e10;
/// The shortest retry delay; 0 would retry a failing item in a tight loop.
const MIN_BASE_DELAY: f64 = 0.001;

/// `--jobs N` and `jobs = N`: from 1 to [`MAX_JOBS`].
pub fn parse_jobs(text: &str) -> Result<usize, String> {
    let n: usize = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    check_jobs(n)
}

fn check_jobs(n: usize) -> Result<usize, String> {
    if (1..=MAX_JOBS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not between 1 and {MAX_JOBS}"))
    }
}

/// The documented example, compiled in so `nixpush daemon --print-config-example` always matches.
pub const EXAMPLE: &str = include_str!("../../../contrib/nixpush.toml");

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub to: Option<String>,
    #[serde(default)]
    pub secret_key_files: Vec<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub jobs: Option<usize>,
    #[serde(default)]
    pub skip_signed_by: Vec<String>,
    pub retry_base_delay: Option<f64>,
    pub retry_max_delay: Option<f64>,
    pub retry_give_up_after: Option<f64>,
    pub gc_roots_dir: Option<PathBuf>,
    pub gc_roots_max: Option<usize>,
    pub spill_dir: Option<PathBuf>,
    pub metrics_textfile: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub yield_to_builds: Option<bool>,
    pub upload_logs: Option<bool>,
    pub stop_timeout: Option<f64>,
    pub keep_finished: Option<f64>,
    pub gather: Option<f64>,
}

/// The keys that say where things are recorded, which the hook must honour even in a file that
/// does not parse: recording elsewhere would put builds where no daemon looks.
const LOCATION_KEYS: [&str; 4] = ["state-dir", "socket", "spill-dir", "gc-roots-dir"];

impl Config {
    /// `NIXPUSH_CONFIG` if set (the file must exist), else the default path (optional).
    pub fn load() -> Result<Config> {
        match std::env::var_os("NIXPUSH_CONFIG").filter(|v| !v.is_empty()) {
            Some(p) => Self::load_from(Path::new(&p)),
            None if Path::new(DEFAULT_PATH).exists() => Self::load_from(Path::new(DEFAULT_PATH)),
            None => Ok(Config::default()),
        }
    }

    /// For the hook, which must record whatever the file says: the configuration, or, when it does
    /// not load, the locations it names (read as well as the file allows) with the error.
    pub fn load_lenient() -> (Config, Option<anyhow::Error>) {
        let e = match Self::load() {
            Ok(c) => return (c, None),
            Err(e) => e,
        };
        let path = std::env::var_os("NIXPUSH_CONFIG")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_PATH), PathBuf::from);
        let text = std::fs::read_to_string(path).unwrap_or_default();
        (Self::locations(&text), Some(e))
    }

    /// The location keys of a configuration that does not parse as a whole: from its TOML table
    /// when it is valid TOML (a bad value or an unknown key elsewhere), else line by line.
    fn locations(text: &str) -> Config {
        let mut found: Vec<(&str, String)> = Vec::new();
        match toml::from_str::<toml::Table>(text) {
            Ok(table) => {
                for key in LOCATION_KEYS {
                    if let Some(v) = table.get(key).and_then(|v| v.as_str()) {
                        found.push((key, v.to_owned()));
                    }
                }
            }
            Err(_) => {
                for line in text.lines() {
                    let Some((k, v)) = line.split_once('=') else {
                        continue;
                    };
                    let (k, v) = (k.trim(), v.trim());
                    let Some(key) = LOCATION_KEYS.into_iter().find(|key| *key == k) else {
                        continue;
                    };
                    if let Some(v) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                        found.push((key, v.to_owned()));
                    }
                }
            }
        }
        let mut c = Config::default();
        for (key, v) in found {
            let v = Some(PathBuf::from(v));
            match key {
                "state-dir" => c.state_dir = v,
                "socket" => c.socket = v,
                "spill-dir" => c.spill_dir = v,
                _ => c.gc_roots_dir = v,
            }
        }
        c
    }

    pub fn load_from(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text)?;
        for (name, v, min, max) in [
            (
                "retry-base-delay",
                c.retry_base_delay,
                MIN_BASE_DELAY,
                MAX_SECONDS,
            ),
            (
                "retry-max-delay",
                c.retry_max_delay,
                MIN_BASE_DELAY,
                MAX_SECONDS,
            ),
            (
                "retry-give-up-after",
                c.retry_give_up_after,
                0.0,
                MAX_SECONDS,
            ),
            ("stop-timeout", c.stop_timeout, 0.0, MAX_SECONDS),
            (
                "keep-finished",
                c.keep_finished,
                MIN_BASE_DELAY,
                MAX_SECONDS,
            ),
            ("gather", c.gather, 0.0, MAX_GATHER),
        ] {
            if let Some(v) = v {
                anyhow::ensure!(
                    (min..=max).contains(&v),
                    "`{name}` must be a number of seconds from {min} to {max}, not {v}"
                );
            }
        }
        if let (Some(base), Some(max)) = (c.retry_base_delay, c.retry_max_delay) {
            anyhow::ensure!(
                base <= max,
                "`retry-base-delay` ({base}) is more than `retry-max-delay` ({max})"
            );
        }
        if let Some(jobs) = c.jobs {
            check_jobs(jobs).map_err(|e| anyhow::anyhow!("`jobs`: {e}"))?;
        }
        Ok(c)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
    }

    pub fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into())
    }

    pub fn spill_dir(&self) -> PathBuf {
        self.spill_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_SPILL_DIR.into())
    }

    /// Where queued items are rooted, unless roots are turned off (`gc-roots-dir = ""`).
    pub fn gc_roots(&self) -> Option<nixpush_store::GcRoots> {
        match &self.gc_roots_dir {
            Some(d) if d.as_os_str().is_empty() => None,
            Some(d) => Some(nixpush_store::GcRoots::new(d)),
            None => Some(nixpush_store::GcRoots::new(DEFAULT_GC_ROOTS_DIR)),
        }
    }

    pub fn gc_roots_max(&self) -> usize {
        self.gc_roots_max.unwrap_or(DEFAULT_GC_ROOTS_MAX)
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT))
    }

    pub fn gather(&self) -> Duration {
        Duration::from_secs_f64(self.gather.unwrap_or(DEFAULT_GATHER))
    }

    pub fn keep_finished(&self) -> Duration {
        Duration::from_secs_f64(self.keep_finished.unwrap_or(DEFAULT_KEEP_FINISHED))
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        let d = RetryPolicy::default();
        let secs = |v: Option<f64>, default: Duration| v.map_or(default, Duration::from_secs_f64);
        RetryPolicy {
            base_delay: secs(self.retry_base_delay, d.base_delay),
            max_delay: secs(self.retry_max_delay, d.max_delay),
            give_up_after: secs(self.retry_give_up_after, d.give_up_after),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_to_the_defaults() {
        assert_eq!(Config::parse(EXAMPLE).unwrap(), Config::default());
        // ... and, uncommented, every key in it is accepted.
        let uncommented: String = EXAMPLE
            .lines()
            .filter_map(|l| l.strip_prefix("# ").filter(|l| l.contains(" = ")))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&uncommented).unwrap();
        assert_eq!(c.jobs, Some(16));
        assert_eq!(c.retry_policy(), RetryPolicy::default());
    }

    /// Regression: a configuration that failed to parse made the hook record into the default state
    /// directory, which no daemon reads.
    #[test]
    fn the_locations_of_a_broken_config_are_still_read() {
        let valid_toml = "state-dir = \"/srv/q\"\nsocket = \"/srv/s.sock\"\njobz = 3\n";
        assert!(Config::parse(valid_toml).is_err());
        let c = Config::locations(valid_toml);
        assert_eq!(c.state_dir(), PathBuf::from("/srv/q"));
        assert_eq!(c.socket(), PathBuf::from("/srv/s.sock"));
        let broken = "to = \"s3://b\nstate-dir = \"/srv/q\"\n  spill-dir=\"/srv/spill\"\n[[[\n";
        let c = Config::locations(broken);
        assert_eq!(c.state_dir(), PathBuf::from("/srv/q"));
        assert_eq!(c.spill_dir(), PathBuf::from("/srv/spill"));
        assert_eq!(c.socket(), PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = format!(
            "{:#}",
            Config::parse("to = \"s3://b\"\njobz = 3\n").unwrap_err()
        );
        assert!(e.contains("jobz"), "{e}");
        let e = format!("{:#}", Config::parse("retry-max-delay = -1.0").unwrap_err());
        assert!(e.contains("retry-max-delay"), "{e}");
    }

    /// Regression: `retry-give-up-after = 1e30` panicked converting to a Duration,
    /// `retry-base-delay = 0` retried in a tight loop, and a huge `jobs` panicked.
    #[test]
    fn out_of_range_values_are_named_errors() {
        for (text, key) in [
            ("retry-give-up-after = 1e30", "retry-give-up-after"),
            ("retry-max-delay = inf", "retry-max-delay"),
            ("retry-base-delay = nan", "retry-base-delay"),
            ("retry-base-delay = 0", "retry-base-delay"),
            (
                "retry-base-delay = 10.0\nretry-max-delay = 5.0",
                "retry-base-delay",
            ),
            ("jobs = 0", "jobs"),
            ("jobs = 1000000000000", "jobs"),
        ] {
            let e = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(e.contains(key), "{text}: {e}");
        }
        for text in ["gather = -0.1", "gather = 61"] {
            let e = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(
                e.contains("`gather` must be a number of seconds from 0 to 60"),
                "{e}"
            );
        }
        let c = Config::parse("retry-give-up-after = 1e10\njobs = 1024").unwrap();
        assert_eq!(
            c.retry_policy().give_up_after,
            Duration::from_secs(10_000_000_000)
        );
        assert_eq!(
            parse_jobs("1025"),
            Err("1025 is not between 1 and 1024".into())
        );
        assert_eq!(parse_jobs("x"), Err("`x` is not a whole number".into()));
        assert_eq!(parse_jobs("16"), Ok(16));
    }
}
