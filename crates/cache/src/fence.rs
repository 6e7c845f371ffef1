//! The collector's state as a pusher sees it: the phase a collection of the cache is in, and a
//! sequence number that each change of phase increments (see README.md, "Retention"). A pusher
//! compares two observations to learn whether a collection may have deleted something between
//! them, so that it knows when what it found present, or uploaded, can no longer be trusted.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::CacheError;
use crate::target::Target;

/// Where the collector keeps its state.
pub const STATE_KEY: &str = "nixpush/gc/state.json";
/// A collector rewrites its state at least this often while it deletes, and stops deleting when it
/// could not for this long: a state older than this (and [`CLOCK_SKEW`]) is a collector's that died.
pub const LEASE: Duration = Duration::from_secs(300);
/// A pusher puts a narinfo up within this of uploading its NAR (else it uploads the NAR again);
/// the collector keeps NARs younger than this (and [`CLOCK_SKEW`]) whoever needs them.
pub const NAR_WINDOW: Duration = Duration::from_secs(3600);
/// How far the clocks of a pusher and the server may differ: S3 refuses requests signed further
/// apart than this.
pub const CLOCK_SKEW: Duration = Duration::from_secs(900);

/// How long a pusher waits for a collection's deletions to end before its push fails (to be tried
/// again).
pub const WAIT_FOR_DELETIONS: Duration = Duration::from_secs(600);
/// How often it looks while it waits.
const POLL_WHILE_DELETING: Duration = Duration::from_secs(1);

/// The state object's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    pub seq: u64,
    pub phase: Phase,
    /// The collection's id, for messages and its report.
    pub run: String,
    /// Where it runs.
    pub host: String,
}

impl GcState {
    /// What a pusher makes of this state, written at `modified` (the server's clock), at `now`. A
    /// collection whose state is older than its lease has stopped deleting: it counts as ended.
    pub fn observation(&self, modified: Option<SystemTime>, now: SystemTime) -> Observation {
        let expired = modified.is_some_and(|m| m + LEASE + CLOCK_SKEW < now);
        if self.phase != Phase::Idle && expired {
            Observation {
                seq: self.seq + 1,
                phase: Phase::Idle,
            }
        } else {
            Observation {
                seq: self.seq,
                phase: self.phase,
            }
        }
    }
}

/// The collector's state as one publisher follows it. A look is a GET of the state object; looks
/// that need one begun after the same moment share it.
pub(crate) struct Watch {
    target: Arc<Target>,
    /// The last look: when it began, what it saw, and the run it saw.
    last: tokio::sync::Mutex<Option<(Instant, Observation, String)>>,
}

impl Watch {
    pub(crate) fn new(target: Arc<Target>) -> Self {
        Watch {
            target,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The state as a look begun after `after` saw it, once it is not Deleting: while a collection
    /// deletes, this waits (up to [`WAIT_FOR_DELETIONS`]) and looks again.
    pub(crate) async fn look_after(&self, mut after: Instant) -> Result<Observation, CacheError> {
        let started = Instant::now();
        loop {
            let (seen, run) = {
                let mut last = self.last.lock().await;
                match &*last {
                    Some((at, seen, run)) if *at >= after => (*seen, run.clone()),
                    _ => {
                        let at = Instant::now();
                        let (seen, run) = self.read().await?;
                        *last = Some((at, seen, run.clone()));
                        (seen, run)
                    }
                }
            };
            if seen.phase != Phase::Deleting {
                return Ok(seen);
            }
            if started.elapsed() >= WAIT_FOR_DELETIONS {
                return Err(CacheError::CollectionDeleting {
                    run,
                    waited_s: started.elapsed().as_secs(),
                });
            }
            tokio::time::sleep(POLL_WHILE_DELETING).await;
            after = Instant::now();
        }
    }

    async fn read(&self) -> Result<(Observation, String), CacheError> {
        let Some((body, modified)) = self.target.get_dated(STATE_KEY).await? else {
            return Ok((Observation::NEVER, String::new()));
        };
        let state: GcState = serde_json::from_slice(&body).map_err(|e| CacheError::BadRecord {
            key: STATE_KEY.to_owned(),
            message: e.to_string(),
        })?;
        Ok((state.observation(modified, SystemTime::now()), state.run))
    }
}

/// A collection's phase: `Deleting` is the only one in which objects go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Idle,
    Marking,
    Deleting,
}

/// The state at one moment. Each collection goes Idle → Marking → Deleting → Idle, one step of
/// `seq` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Observation {
    pub seq: u64,
    pub phase: Phase,
}

impl Observation {
    /// The state of a cache no collection has run on.
    pub const NEVER: Observation = Observation {
        seq: 0,
        phase: Phase::Idle,
    };

    /// Whether a collection may have deleted something after `earlier` was observed and up to
    /// this observation: it is deleting now, or a deleting phase began (or went on) in between.
    pub fn deleted_since(&self, earlier: &Observation) -> bool {
        if self.phase == Phase::Deleting {
            return true;
        }
        match self.seq.saturating_sub(earlier.seq) {
            0 => false,
            // Idle → Marking deletes nothing; Deleting → Idle ends deletions that went on after
            // `earlier` (Marking → Deleting is caught above).
            1 => earlier.phase != Phase::Idle,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64, phase: Phase) -> Observation {
        Observation { seq, phase }
    }

    #[test]
    fn a_collector_silent_past_its_lease_counts_as_ended() {
        let state = GcState {
            seq: 7,
            phase: Phase::Deleting,
            run: "r".into(),
            host: "h".into(),
        };
        let now = SystemTime::now();
        assert_eq!(
            state.observation(Some(now - LEASE), now),
            at(7, Phase::Deleting)
        );
        let ended = state.observation(Some(now - LEASE - CLOCK_SKEW - LEASE), now);
        assert_eq!(ended, at(8, Phase::Idle));
        assert!(ended.deleted_since(&at(6, Phase::Marking)));
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains(r#""phase":"deleting""#), "{json}");
        assert_eq!(serde_json::from_str::<GcState>(&json).unwrap(), state);
    }

    #[test]
    fn only_a_deleting_phase_between_two_observations_counts() {
        use Phase::*;
        let cases = [
            (at(0, Idle), at(0, Idle), false),
            (at(0, Idle), at(1, Marking), false),
            (at(1, Marking), at(1, Marking), false),
            (at(1, Marking), at(2, Deleting), true),
            (at(2, Deleting), at(3, Idle), true),
            (at(1, Marking), at(3, Idle), true),
            (at(0, Idle), at(3, Idle), true),
            (at(3, Idle), at(4, Marking), false),
            (at(0, Idle), at(4, Marking), true),
        ];
        for (earlier, now, deleted) in cases {
            assert_eq!(
                now.deleted_since(&earlier),
                deleted,
                "{earlier:?} → {now:?}"
            );
        }
    }
}
