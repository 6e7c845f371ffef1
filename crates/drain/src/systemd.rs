//! Telling systemd how the daemon is (`Type=notify`): ready once the hook's socket accepts, alive
//! while the worker's loop turns (the watchdog: a loop stuck for `WatchdogSec` gets the daemon
//! restarted), stopping on SIGTERM. Outside systemd (no `NOTIFY_SOCKET`) each call does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

fn notify(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub(crate) fn ready() {
    notify(NotifyState::Ready);
}

pub(crate) fn stopping() {
    notify(NotifyState::Stopping);
}

/// Pings systemd's watchdog at half its interval, when the unit has one.
pub(crate) struct Watchdog {
    every: Option<Duration>,
    last: Option<Instant>,
}

impl Watchdog {
    pub(crate) fn new() -> Self {
        let mut usec = 0;
        let every = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec) / 2)
            .filter(|d| !d.is_zero());
        Watchdog { every, last: None }
    }

    /// How long the loop may wait before it must call [`Watchdog::alive`] again.
    pub(crate) fn within(&self) -> Option<Duration> {
        self.every
    }

    /// Says the loop is turning, if it is time to.
    pub(crate) fn alive(&mut self) {
        let Some(every) = self.every else {
            return;
        };
        if self.last.is_none_or(|t| t.elapsed() >= every) {
            notify(NotifyState::Watchdog);
            self.last = Some(Instant::now());
        }
    }
}
