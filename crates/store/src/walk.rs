//! The closure walk of [`crate::Store::closure`]: breadth-first over references, with up to `jobs`
//! queries at once. Apart from the store, so that what the walkers do when a query fails or panics
//! is tested without a daemon.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::{Condvar, Mutex};

use nixpush_format::StorePath;

use crate::{PathInfo, StoreError};

/// One path's query.
type Query<'q> = dyn Fn(&StorePath) -> Result<PathInfo, StoreError> + Sync + 'q;

/// Path infos of `roots` and everything they reference, transitively, as `query` answers for each,
/// except past a reference for which `stop` holds; the first error ends the walk.
pub(crate) fn closure(
    roots: &[StorePath],
    jobs: usize,
    stop: &(dyn Fn(&StorePath) -> bool + Sync),
    query: impl Fn(&StorePath) -> Result<PathInfo, StoreError> + Sync,
) -> Result<BTreeMap<StorePath, PathInfo>, StoreError> {
    let roots: BTreeSet<StorePath> = roots.iter().cloned().collect();
    let walk = Mutex::new(Walk {
        queue: roots.iter().cloned().collect(),
        seen: roots.into_iter().collect(),
        walkers: 1,
        ..Walk::default()
    });
    let more = Condvar::new();
    let jobs = jobs.max(1);
    // The calling thread walks too, and helpers join while more paths wait than walkers: a deep,
    // narrow closure never starts a thread, and a wide one starts at most `jobs - 1`, once for
    // the whole walk rather than for every layer.
    std::thread::scope(|s| {
        fn walker<'s, 'e: 's>(
            query: &'e Query<'e>,
            walk: &'e Mutex<Walk>,
            more: &'e Condvar,
            stop: &'e (dyn Fn(&StorePath) -> bool + Sync),
            jobs: usize,
            s: &'s std::thread::Scope<'s, 'e>,
        ) {
            let lock = || walk.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let path = {
                    let mut w = lock();
                    loop {
                        if w.error.is_some() {
                            return;
                        }
                        if let Some(p) = w.queue.pop_front() {
                            w.busy += 1;
                            break p;
                        }
                        if w.busy == 0 {
                            more.notify_all();
                            return;
                        }
                        w = more.wait(w).unwrap_or_else(|e| e.into_inner());
                    }
                };
                // A panic must end the walk as an error: a walker that vanished while busy
                // would leave the others waiting for it for good.
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| query(&path)))
                        .unwrap_or_else(|_| {
                            Err(StoreError::Protocol(format!(
                                "the query of {path} panicked"
                            )))
                        });
                let mut w = lock();
                w.busy -= 1;
                match result {
                    Ok(info) => {
                        for r in &info.references {
                            if *r != info.path && !stop(r) && w.seen.insert(r.clone()) {
                                w.queue.push_back(r.clone());
                            }
                        }
                        w.infos.insert(info.path.clone(), info);
                    }
                    // The first error is the walk's: the daemon decides on it (reconnect or
                    // not), and a later one may only be its consequence.
                    Err(e) => {
                        w.error.get_or_insert(e);
                    }
                }
                let idle = w.walkers - w.busy;
                let spawn = w.queue.len() > idle && w.walkers < jobs;
                if spawn {
                    w.walkers += 1;
                }
                drop(w);
                more.notify_all();
                if spawn {
                    s.spawn(move || walker(query, walk, more, stop, jobs, s));
                }
            }
        }
        walker(&query, &walk, &more, stop, jobs, s);
    });
    let walk = walk.into_inner().unwrap_or_else(|e| e.into_inner());
    match walk.error {
        Some(e) => Err(e),
        None => Ok(walk.infos),
    }
}

/// What the walkers share.
#[derive(Default)]
struct Walk {
    /// Paths to query, and every path ever queued.
    queue: VecDeque<StorePath>,
    seen: HashSet<StorePath>,
    infos: BTreeMap<StorePath, PathInfo>,
    /// Walkers started, and those with a query under way.
    walkers: usize,
    busy: usize,
    error: Option<StoreError>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixpush_format::Sha256;
    use std::collections::HashMap;

    /// A store path named `name`, with a hash part of its own.
    fn path(name: &str) -> StorePath {
        let hash = Sha256::digest(name.as_bytes()).to_nix32();
        format!("/nix/store/{}-{name}", &hash[..32])
            .parse()
            .unwrap()
    }

    /// A store of `width` paths per level over `depth` levels, each referencing two of the level
    /// below: each path with its references.
    fn layered(depth: usize, width: usize) -> HashMap<StorePath, Vec<StorePath>> {
        let name = |d: usize, i: usize| path(&format!("l{d}-{i}"));
        (0..depth)
            .flat_map(|d| (0..width).map(move |i| (d, i)))
            .map(|(d, i)| {
                let refs = if d == 0 {
                    Vec::new()
                } else {
                    vec![name(d - 1, i), name(d - 1, (i + 1) % width)]
                };
                (name(d, i), refs)
            })
            .collect()
    }

    fn info(p: &StorePath, references: &[StorePath]) -> PathInfo {
        PathInfo {
            path: p.clone(),
            deriver: None,
            nar_hash: Sha256::digest(p.to_string().as_bytes()),
            nar_size: 1,
            references: references.to_vec(),
            registration_time: 0,
            ultimate: false,
            sigs: Vec::new(),
            ca: None,
        }
    }

    fn tops(store: &HashMap<StorePath, Vec<StorePath>>, depth: usize) -> Vec<StorePath> {
        let prefix = format!("-l{}-", depth - 1);
        store
            .keys()
            .filter(|p| p.to_string().contains(&prefix))
            .cloned()
            .collect()
    }

    #[test]
    fn every_path_is_queried_once_and_stop_prunes() {
        let store = layered(6, 20);
        let asked = Mutex::new(Vec::new());
        let query = |p: &StorePath| {
            asked.lock().unwrap().push(p.clone());
            Ok(info(p, &store[p]))
        };
        let all = closure(&tops(&store, 6), 4, &|_| false, query).unwrap();
        assert_eq!(all.len(), 120);
        let mut asked = std::mem::take(&mut *asked.lock().unwrap());
        asked.sort();
        asked.dedup();
        assert_eq!(asked.len(), 120, "a path was asked about twice");

        // Past level 3, nothing: the walk stops at the references known to be in the cache.
        let known = |p: &StorePath| p.to_string().contains("-l3-");
        let above = closure(&tops(&store, 6), 4, &known, |p| Ok(info(p, &store[p]))).unwrap();
        assert_eq!(above.len(), 40, "levels 4 and 5 only");
    }

    #[test]
    fn the_first_error_ends_the_walk() {
        let store = layered(6, 20);
        let failing = path("l2-7");
        let result = closure(&tops(&store, 6), 4, &|_| false, |p| {
            if *p == failing {
                Err(StoreError::NotValid(p.clone()))
            } else {
                Ok(info(p, &store[p]))
            }
        });
        match result {
            Err(StoreError::NotValid(p)) => assert_eq!(p, failing),
            other => panic!("expected the failed query's error, got {other:?}"),
        }
    }

    /// A query that panics on a helper thread ends the walk with an error naming its path; the
    /// other walkers, waiting for it, are not left waiting for good.
    #[test]
    fn a_panicking_query_ends_the_walk_as_an_error() {
        let store = layered(6, 20);
        let bad = path("l1-3");
        let (sent, walked) = std::sync::mpsc::channel();
        let expected = bad.clone();
        std::thread::spawn(move || {
            let result = closure(&tops(&store, 6), 4, &|_| false, |p| {
                assert!(*p != bad, "a query that breaks");
                Ok(info(p, &store[p]))
            });
            let _ = sent.send(result);
        });
        // A walk of 120 made-up paths takes milliseconds; a minute means walkers wait for good.
        let result = walked
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the walk never ended");
        match result {
            Err(StoreError::Protocol(message)) => {
                assert!(message.contains(&expected.to_string()), "{message}")
            }
            other => panic!("expected the panic as an error, got {other:?}"),
        }
    }
}
