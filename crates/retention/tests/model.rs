//! A model of the retention protocol: pushers and a collector interleaved in every possible order
//! over a small cache, each state checked for a narinfo without its NAR, a narinfo whose reference
//! is gone, or a hole in the closure of a pin or of a push that reported success.
//!
//! The collector's decisions are the real ones ([`nixpush_retention::plan`]); the protocol steps
//! around them are modelled. Each safeguard can be switched off, and the test shows that the
//! explorer then finds a history that breaks the cache, printed step by step.
//!
//! The cache, by hash part (`F` has the same contents as `B`, so they share one NAR):
//!
//! ```text
//! K (pinned)     B -> A (old, unrooted)     Z -> Y (old, unrooted)
//! pusher 0: C -> A, then D -> A (A remembered from the first push)
//! pusher 1: F (a large NAR, found present: B's)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashSet};

use nixpush_cache::fence::{Observation, Phase};
use nixpush_retention::plan::{self, Node};

const A: u8 = 0;
const B: u8 = 1;
const C: u8 = 2;
const D: u8 = 3;
const F: u8 = 4;
const K: u8 = 5;
const Y: u8 = 6;
const Z: u8 = 7;
const NAMES: [&str; 8] = ["A", "B", "C", "D", "F", "K", "Y", "Z"];

fn refs(p: u8) -> &'static [u8] {
    match p {
        B | C | D => &[A],
        Z => &[Y],
        _ => &[],
    }
}

/// The NAR of a path, named as the path (F's is B's).
fn nar(p: u8) -> u8 {
    if p == F { B } else { p }
}

fn bit(p: u8) -> u8 {
    1 << p
}

fn members(mask: u8) -> impl Iterator<Item = u8> {
    (0..8).filter(move |p| mask & bit(*p) != 0)
}

fn closure(p: u8) -> u8 {
    refs(p).iter().fold(bit(p), |m, r| m | closure(*r))
}

/// What each pusher pushes, in order: (the paths it publishes or relies on, deps first; its root).
const PUSHES: [&[(&[u8], u8)]; 2] = [&[(&[A, C], C), (&[A, D], D)], &[(&[F], F)]];

/// The protocol's safeguards; the model runs with all of them, then without each.
#[derive(Clone, Copy, Debug)]
struct Safeguards {
    /// A pusher records what it will publish or rely on (its session) before it probes.
    session: bool,
    /// ...then reads the collector's state, and waits while it is deleting.
    state_check: bool,
    /// The collector lists sessions again after it announced it is deleting.
    remark: bool,
    /// A pusher forgets what it knew of the cache when a collection ran since it learned it.
    memory_clear: bool,
    /// Narinfos are deleted referrers first.
    referrers_first: bool,
    /// NAR garbage is what no surviving narinfo points to (not the NARs of the dead).
    nars_from_survivors: bool,
    /// Before relying on a NAR found present, a pusher records it in its session, then reads the
    /// state again.
    nar_session: bool,
    /// NARs written within the freshness window are kept, and a pusher whose NAR left the window
    /// before its narinfo went up uploads the NAR again.
    young_nars: bool,
    /// After uploading a NAR and before the narinfo that points to it, a pusher reads the state
    /// again: it waits while the collector deletes, and uploads the NAR again if a collection began
    /// since its push did.
    nar_check: bool,
}

const ALL: Safeguards = Safeguards {
    session: true,
    state_check: true,
    remark: true,
    memory_clear: true,
    referrers_first: true,
    nars_from_survivors: true,
    nar_session: true,
    young_nars: true,
    nar_check: true,
};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Sub {
    Probe,
    NarSession,
    NarState,
    NarProbe,
    NarPut,
    NarCheck,
    NarinfoPut,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Step {
    Session,
    State,
    Path(u8, Sub),
    Done,
    Finished,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Pusher {
    push: u8,
    step: Step,
    /// Paths known to be in the cache (published or found present), and the collector's state
    /// when that knowledge was last checked.
    memory: u8,
    memory_checked: Observation,
    /// The collector's state when it last looked (before its probes, after its NAR uploads).
    looked: Observation,
    /// It found its large NAR present and skips uploading it.
    nar_found: bool,
    /// Roots of its pushes that reported success and whose sessions are still kept.
    guaranteed: u8,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum GcStep {
    Begin,
    Mark,
    SetDeleting,
    Remark,
    Delete,
    NarSweep,
    DeleteNars,
    End,
    Over,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Gc {
    runs_left: u8,
    step: GcStep,
    candidates: u8,
    /// Narinfos and NARs written within the window before the run began, or during it.
    fresh_narinfos: u8,
    fresh_nars: u8,
    nar_garbage: u8,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct World {
    narinfos: u8,
    nars: u8,
    /// Written within the freshness window (a tick moves the window past everything).
    young_narinfos: u8,
    young_nars: u8,
    ticks_left: u8,
    /// Each push's session: (paths, NARs relied on), while kept.
    sessions: [[Option<(u8, u8)>; 2]; 2],
    state: Observation,
    pushers: [Pusher; 2],
    gc: Gc,
}

impl World {
    fn start(runs: u8, ticks: u8) -> World {
        let old = bit(A) | bit(B) | bit(K) | bit(Y) | bit(Z);
        let pusher = Pusher {
            push: 0,
            step: Step::Session,
            memory: 0,
            memory_checked: Observation::NEVER,
            looked: Observation::NEVER,
            nar_found: false,
            guaranteed: 0,
        };
        World {
            narinfos: old,
            nars: old,
            young_narinfos: 0,
            young_nars: 0,
            ticks_left: ticks,
            sessions: [[None; 2]; 2],
            state: Observation::NEVER,
            pushers: [pusher.clone(), pusher],
            gc: Gc {
                runs_left: runs,
                step: GcStep::Begin,
                candidates: 0,
                fresh_narinfos: 0,
                fresh_nars: 0,
                nar_garbage: 0,
            },
        }
    }

    fn write_narinfo(&mut self, p: u8) {
        self.narinfos |= bit(p);
        self.young_narinfos |= bit(p);
        if self.state.phase != Phase::Idle {
            self.gc.fresh_narinfos |= bit(p);
        }
    }

    fn write_nar(&mut self, n: u8) {
        self.nars |= bit(n);
        self.young_nars |= bit(n);
        if self.state.phase != Phase::Idle {
            self.gc.fresh_nars |= bit(n);
        }
    }

    fn session_paths(&self) -> u8 {
        self.sessions
            .iter()
            .flatten()
            .flatten()
            .fold(0, |m, s| m | s.0)
    }

    fn session_nars(&self) -> u8 {
        self.sessions
            .iter()
            .flatten()
            .flatten()
            .fold(0, |m, s| m | s.1)
    }

    /// The narinfos as the collector lists them.
    fn listing(&self) -> BTreeMap<String, Node> {
        members(self.narinfos)
            .map(|p| {
                (
                    NAMES[p as usize].to_owned(),
                    Node {
                        references: refs(p)
                            .iter()
                            .map(|r| NAMES[*r as usize].to_owned())
                            .collect(),
                        nar: NAMES[nar(p) as usize].to_owned(),
                    },
                )
            })
            .collect()
    }

    /// The collector's mark: narinfos no root reaches.
    fn dead(&self) -> u8 {
        let roots = bit(K) | self.session_paths() | self.gc.fresh_narinfos;
        let live = plan::live(members(roots).map(|p| NAMES[p as usize]), &self.listing());
        members(self.narinfos)
            .filter(|p| !live.contains(NAMES[*p as usize]))
            .fold(0, |m, p| m | bit(p))
    }

    /// What breaks the cache in this state, if anything.
    fn violation(&self) -> Option<String> {
        for p in members(self.narinfos) {
            if self.nars & bit(nar(p)) == 0 {
                return Some(format!("{} is visible without its NAR", NAMES[p as usize]));
            }
            for r in refs(p) {
                if self.narinfos & bit(*r) == 0 {
                    return Some(format!(
                        "{} is visible, its reference {} is not",
                        NAMES[p as usize], NAMES[*r as usize]
                    ));
                }
            }
        }
        let roots = self.pushers.iter().fold(bit(K), |m, p| m | p.guaranteed);
        for root in members(roots) {
            for p in members(closure(root)) {
                if self.narinfos & bit(p) == 0 || self.nars & bit(nar(p)) == 0 {
                    return Some(format!(
                        "the closure of {} has a hole at {}",
                        NAMES[root as usize], NAMES[p as usize]
                    ));
                }
            }
        }
        None
    }

    /// Every step some actor can take now, with a label for the history.
    fn successors(&self, s: Safeguards) -> Vec<(String, World)> {
        let mut next = Vec::new();
        for (i, pushes) in PUSHES.iter().enumerate() {
            if let Some(w) = self.pusher_step(i, s) {
                next.push(w);
            }
            // A kept session ends: no more promises for its root. The collector decides which
            // sessions it keeps once per run, by their age at the run's start.
            for (push, &(_, root)) in pushes.iter().enumerate() {
                if matches!(self.gc.step, GcStep::Begin | GcStep::Over)
                    && self.sessions[i][push].is_some()
                    && (self.pushers[i].push as usize > push
                        || self.pushers[i].step == Step::Finished)
                {
                    let mut w = self.clone();
                    w.sessions[i][push] = None;
                    w.pushers[i].guaranteed &= !bit(root);
                    next.push((format!("policy drops session {i}.{push}"), w));
                }
            }
        }
        if let Some(w) = self.gc_step(s) {
            next.push(w);
        }
        if self.ticks_left > 0 && (self.young_narinfos | self.young_nars) != 0 {
            let mut w = self.clone();
            w.ticks_left -= 1;
            w.young_narinfos = 0;
            w.young_nars = 0;
            next.push(("time passes the freshness window".into(), w));
        }
        next
    }

    fn pusher_step(&self, i: usize, s: Safeguards) -> Option<(String, World)> {
        let mut w = self.clone();
        let me = &self.pushers[i];
        let &(paths, root) = PUSHES[i].get(me.push as usize)?;
        let all = paths.iter().fold(0, |m, p| m | bit(*p));
        let label;
        match me.step {
            Step::Finished => return None,
            Step::Session => {
                if s.session {
                    w.sessions[i][me.push as usize] = Some((all, 0));
                }
                w.pushers[i].step = Step::State;
                label = "records its session".to_owned();
            }
            Step::State => {
                if s.state_check && self.state.phase == Phase::Deleting {
                    return None;
                }
                if s.memory_clear && self.state.deleted_since(&me.memory_checked) {
                    w.pushers[i].memory = 0;
                }
                w.pushers[i].memory_checked = self.state;
                w.pushers[i].looked = self.state;
                w.pushers[i].step = Step::Path(0, Sub::Probe);
                label = format!("reads state {}", show_state(self.state));
            }
            Step::Path(k, sub) => {
                let p = paths[k as usize];
                let name = NAMES[p as usize];
                let after = if k as usize + 1 == paths.len() {
                    Step::Done
                } else {
                    Step::Path(k + 1, Sub::Probe)
                };
                let large = p == F;
                match sub {
                    Sub::Probe => {
                        if me.memory & bit(p) != 0 {
                            w.pushers[i].step = after;
                            label = format!("knows {name} is there");
                        } else if self.narinfos & bit(p) != 0 {
                            w.pushers[i].memory |= bit(p);
                            w.pushers[i].step = after;
                            label = format!("finds {name} present");
                        } else {
                            w.pushers[i].step = Step::Path(
                                k,
                                match (large, s.nar_session) {
                                    (true, true) => Sub::NarSession,
                                    (true, false) => Sub::NarProbe,
                                    _ => Sub::NarPut,
                                },
                            );
                            label = format!("finds {name} missing");
                        }
                    }
                    Sub::NarSession => {
                        let session = w.sessions[i][me.push as usize].as_mut();
                        if let Some(session) = session {
                            session.1 |= bit(nar(p));
                        }
                        w.pushers[i].step = Step::Path(k, Sub::NarState);
                        label = format!("records NAR {} in its session", NAMES[nar(p) as usize]);
                    }
                    Sub::NarState => {
                        if s.state_check && self.state.phase == Phase::Deleting {
                            return None;
                        }
                        w.pushers[i].step = Step::Path(k, Sub::NarProbe);
                        label = format!("reads state again {}", show_state(self.state));
                    }
                    Sub::NarProbe => {
                        let present = self.nars & bit(nar(p)) != 0;
                        w.pushers[i].nar_found = present;
                        w.pushers[i].step = Step::Path(
                            k,
                            if present {
                                Sub::NarinfoPut
                            } else {
                                Sub::NarPut
                            },
                        );
                        label = format!(
                            "finds NAR {} {}",
                            NAMES[nar(p) as usize],
                            if present { "present" } else { "missing" }
                        );
                    }
                    Sub::NarPut => {
                        w.write_nar(nar(p));
                        w.pushers[i].step = Step::Path(k, Sub::NarCheck);
                        label = format!("uploads NAR {}", NAMES[nar(p) as usize]);
                    }
                    Sub::NarCheck => {
                        if s.state_check && self.state.phase == Phase::Deleting {
                            return None;
                        }
                        let deleted = self.state.deleted_since(&me.looked);
                        w.pushers[i].looked = self.state;
                        w.pushers[i].step = if s.nar_check && deleted {
                            Step::Path(k, Sub::NarPut)
                        } else {
                            Step::Path(k, Sub::NarinfoPut)
                        };
                        label = format!("reads state after its NAR {}", show_state(self.state));
                    }
                    Sub::NarinfoPut => {
                        if s.young_nars && self.young_nars & bit(nar(p)) == 0 && !me.nar_found {
                            w.pushers[i].step = Step::Path(k, Sub::NarPut);
                            label = format!("finds its NAR for {name} out of the window");
                        } else {
                            w.write_narinfo(p);
                            w.pushers[i].nar_found = false;
                            w.pushers[i].memory |= bit(p);
                            w.pushers[i].step = after;
                            label = format!("uploads narinfo {name}");
                        }
                    }
                }
            }
            Step::Done => {
                w.pushers[i].guaranteed |= bit(root);
                w.pushers[i].push += 1;
                w.pushers[i].step = if (me.push as usize + 1) < PUSHES[i].len() {
                    Step::Session
                } else {
                    Step::Finished
                };
                label = format!("reports {} published", NAMES[root as usize]);
            }
        }
        Some((format!("pusher {i} {label}"), w))
    }

    fn gc_step(&self, s: Safeguards) -> Option<(String, World)> {
        let mut w = self.clone();
        let label = match self.gc.step {
            GcStep::Over => return None,
            GcStep::Begin => {
                w.state = Observation {
                    seq: self.state.seq + 1,
                    phase: Phase::Marking,
                };
                w.gc.fresh_narinfos = self.young_narinfos;
                w.gc.fresh_nars = if s.young_nars { self.young_nars } else { 0 };
                w.gc.step = GcStep::Mark;
                format!("gc begins {}", show_state(w.state))
            }
            GcStep::Mark => {
                w.gc.candidates = self.dead();
                w.gc.step = GcStep::SetDeleting;
                format!("gc marks, candidates {}", show(w.gc.candidates))
            }
            GcStep::SetDeleting => {
                w.state = Observation {
                    seq: self.state.seq + 1,
                    phase: Phase::Deleting,
                };
                w.gc.step = if s.remark {
                    GcStep::Remark
                } else {
                    GcStep::Delete
                };
                "gc announces it is deleting".into()
            }
            GcStep::Remark => {
                w.gc.candidates &= self.dead();
                w.gc.step = GcStep::Delete;
                format!("gc marks again, candidates {}", show(w.gc.candidates))
            }
            GcStep::Delete => {
                let dead: BTreeSet<String> = members(self.gc.candidates & self.narinfos)
                    .map(|p| NAMES[p as usize].to_owned())
                    .collect();
                let mut order = plan::deletion_order(&dead, &self.listing());
                if !s.referrers_first {
                    order.reverse();
                }
                match order.first() {
                    Some(first) => {
                        let p = NAMES.iter().position(|n| n == first).unwrap() as u8;
                        w.narinfos &= !bit(p);
                        w.gc.candidates &= !bit(p);
                        if !s.nars_from_survivors {
                            // The dead narinfo's own NAR, whoever else points to it.
                            w.nars &= !bit(nar(p));
                        }
                        format!("gc deletes narinfo {first}")
                    }
                    None => {
                        w.gc.step = GcStep::NarSweep;
                        "gc has deleted the dead narinfos".into()
                    }
                }
            }
            GcStep::NarSweep => {
                let surviving: Vec<Node> = self.listing().into_values().collect();
                let protected: BTreeSet<String> = members(self.gc.fresh_nars | self.session_nars())
                    .map(|n| NAMES[n as usize].to_owned())
                    .collect();
                let garbage = plan::nar_garbage(
                    members(self.nars).map(|n| NAMES[n as usize]),
                    &surviving,
                    &protected,
                );
                w.gc.nar_garbage = garbage
                    .iter()
                    .map(|g| NAMES.iter().position(|n| n == g).unwrap() as u8)
                    .fold(0, |m, n| m | bit(n));
                w.gc.step = GcStep::DeleteNars;
                format!("gc lists NAR garbage {}", show(w.gc.nar_garbage))
            }
            GcStep::DeleteNars => match members(self.gc.nar_garbage).next() {
                Some(n) => {
                    w.nars &= !bit(n);
                    w.gc.nar_garbage &= !bit(n);
                    format!("gc deletes NAR {}", NAMES[n as usize])
                }
                None => {
                    w.gc.step = GcStep::End;
                    "gc has deleted the NAR garbage".into()
                }
            },
            GcStep::End => {
                w.state = Observation {
                    seq: self.state.seq + 1,
                    phase: Phase::Idle,
                };
                w.gc.runs_left -= 1;
                w.gc.step = if w.gc.runs_left > 0 {
                    GcStep::Begin
                } else {
                    GcStep::Over
                };
                "gc ends".into()
            }
        };
        Some((label, w))
    }
}

fn show_state(o: Observation) -> String {
    format!("({} {:?})", o.seq, o.phase)
}

fn show(mask: u8) -> String {
    let names: Vec<&str> = members(mask).map(|p| NAMES[p as usize]).collect();
    format!("{{{}}}", names.join(" "))
}

/// Explores every interleaving from `start`; returns the first history that breaks the cache (its
/// steps and what broke), and how many states were seen.
fn explore(start: World, s: Safeguards) -> (Option<(Vec<String>, String)>, usize) {
    let mut seen: HashSet<World> = HashSet::new();
    let mut path: Vec<String> = Vec::new();
    fn go(
        w: &World,
        s: Safeguards,
        seen: &mut HashSet<World>,
        path: &mut Vec<String>,
    ) -> Option<(Vec<String>, String)> {
        if !seen.insert(w.clone()) {
            return None;
        }
        if let Some(v) = w.violation() {
            return Some((path.clone(), v));
        }
        for (label, next) in w.successors(s) {
            path.push(label);
            if let Some(found) = go(&next, s, seen, path) {
                return Some(found);
            }
            path.pop();
        }
        None
    }
    let found = go(&start, s, &mut seen, &mut path);
    (found, seen.len())
}

/// Every history of two pushers (three pushes) and two collections, with the freshness window
/// passing twice and kept sessions dropped at any point, leaves the cache whole.
#[test]
fn no_interleaving_of_pushes_and_collections_breaks_the_cache() {
    let (found, states) = explore(World::start(2, 2), ALL);
    if let Some((history, broken)) = found {
        panic!("{broken} after:\n  {}", history.join("\n  "));
    }
    eprintln!("{states} states explored, none breaks the cache");
    assert!(
        states > 1000,
        "the model explored too little: {states} states"
    );
}

/// Each safeguard is needed: without it, the explorer finds a history that breaks the cache.
#[test]
fn without_any_one_safeguard_a_history_breaks_the_cache() {
    let without: [(&str, Safeguards); 9] = [
        (
            "session",
            Safeguards {
                session: false,
                ..ALL
            },
        ),
        (
            "state_check",
            Safeguards {
                state_check: false,
                ..ALL
            },
        ),
        (
            "remark",
            Safeguards {
                remark: false,
                ..ALL
            },
        ),
        (
            "memory_clear",
            Safeguards {
                memory_clear: false,
                ..ALL
            },
        ),
        (
            "referrers_first",
            Safeguards {
                referrers_first: false,
                ..ALL
            },
        ),
        (
            "nars_from_survivors",
            Safeguards {
                nars_from_survivors: false,
                ..ALL
            },
        ),
        (
            "nar_session",
            Safeguards {
                nar_session: false,
                ..ALL
            },
        ),
        (
            "young_nars",
            Safeguards {
                young_nars: false,
                ..ALL
            },
        ),
        (
            "nar_check",
            Safeguards {
                nar_check: false,
                ..ALL
            },
        ),
    ];
    for (name, s) in without {
        let (found, states) = explore(World::start(2, 2), s);
        let Some((history, broken)) = found else {
            panic!("without {name}: no history breaks the cache ({states} states)");
        };
        eprintln!(
            "without {name}: {broken}, after {} steps:\n  {}\n",
            history.len(),
            history.join("\n  ")
        );
    }
}
