//! The one configuration file, shared by the daemon, the hook, `status` and `retry`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nixpush_queue::RetryPolicy;
use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/nixpush/nixpush.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nixpush";
pub const DEFAULT_SOCKET: &str = "/run/nixpush/hook.sock";

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
}

impl Config {
    /// `NIXPUSH_CONFIG` if set (the file must exist), else the default path (optional).
    pub fn load() -> Result<Config> {
        match std::env::var_os("NIXPUSH_CONFIG").filter(|v| !v.is_empty()) {
            Some(p) => Self::load_from(Path::new(&p)),
            None if Path::new(DEFAULT_PATH).exists() => Self::load_from(Path::new(DEFAULT_PATH)),
            None => Ok(Config::default()),
        }
    }

    pub fn load_from(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text)?;
        for (name, v) in [
            ("retry-base-delay", c.retry_base_delay),
            ("retry-max-delay", c.retry_max_delay),
            ("retry-give-up-after", c.retry_give_up_after),
        ] {
            if let Some(v) = v {
                anyhow::ensure!(
                    v.is_finite() && v >= 0.0,
                    "`{name}` must be a number of seconds, not {v}"
                );
            }
        }
        anyhow::ensure!(c.jobs != Some(0), "`jobs` must be at least 1");
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
}
