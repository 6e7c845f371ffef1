//! The collector's state as a pusher sees it: the phase a collection of the cache is in, and a
//! sequence number that each change of phase increments (see README.md, "Retention"). A pusher
//! compares two observations to learn whether a collection may have deleted something between
//! them, so that it knows when what it found present, or uploaded, can no longer be trusted.

/// A collection's phase: `Deleting` is the only one in which objects go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
