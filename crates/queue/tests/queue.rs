//! The queue's invariants (see the crate doc), checked directly and against a model.

use std::collections::HashMap;
use std::time::Duration;

use nixpush_queue::{Claimed, Item, Kind, Outcome, Queue, State, now_ms};
use proptest::prelude::*;

fn item(n: &str) -> Item {
    Item {
        name: n.to_owned(),
        kind: Kind::Path,
    }
}

fn far_future() -> i64 {
    i64::MAX / 2
}

#[test]
fn bundled_sqlite_is_recent_enough() {
    // 3.51.3 fixes WAL-reset corruption that concurrent writers (hooks and daemon) could hit.
    assert!(
        rusqlite::version_number() >= 3_051_003,
        "SQLite {}",
        rusqlite::version()
    );
}

#[test]
fn duplicates_collapse_while_pending_but_not_after() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    assert_eq!(q.enqueue(&[item("a"), item("a"), item("b")]).unwrap(), 2);
    assert_eq!(q.enqueue(&[item("a")]).unwrap(), 0);
    let claimed = q.claim(far_future(), 10).unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(
        q.enqueue(&[item("a")]).unwrap(),
        0,
        "in flight counts as pending"
    );
    q.complete(&claimed[0], &Outcome::Done).unwrap();
    assert_eq!(
        q.enqueue(&[item("a")]).unwrap(),
        1,
        "a finished item enqueued again is new work"
    );
}

fn names(items: Vec<Item>) -> Vec<String> {
    items.into_iter().map(|i| i.name).collect()
}

#[test]
fn a_mark_splits_requests_before_it_from_those_after() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    assert_eq!(q.mark().unwrap(), 0);
    q.enqueue(&[item("old-pending"), item("old-done"), item("again")])
        .unwrap();
    let claimed = q.claim(far_future(), 10).unwrap();
    let by_name = |n: &str| claimed.iter().find(|c| c.item.name == n).unwrap();
    q.complete(by_name("old-done"), &Outcome::Done).unwrap();
    q.complete(by_name("again"), &Outcome::Failed("boom".into()))
        .unwrap();
    q.requeue(&[by_name("old-pending").id]).unwrap();
    let mark = q.mark().unwrap();
    assert_eq!(mark, 1);

    // After the mark: a new item, an item already pending (absorbed, but asked for again), and a
    // failed one asked for again (a new row).
    q.enqueue(&[item("new")]).unwrap();
    assert_eq!(q.enqueue(&[item("old-pending"), item("again")]).unwrap(), 1);
    let upto = q.mark().unwrap();
    assert_eq!(upto, 3);
    q.enqueue(&[item("later")]).unwrap();

    assert_eq!(
        names(q.scope(Some(mark)).unwrap()),
        ["old-pending", "new", "again", "later"],
        "requested after the mark"
    );
    assert_eq!(
        names(q.scope(None).unwrap()),
        ["old-pending", "new", "again", "later"],
        "without a mark: everything not published, the superseded failure counted once"
    );
    let latest = q.latest("again").unwrap().unwrap();
    assert_eq!((latest.state, latest.requested), (State::Queued, 3));
    assert_eq!(q.latest("old-done").unwrap().unwrap().state, State::Done);
    assert_eq!(q.latest("never").unwrap(), None);

    // A published item asked for after a mark is in that mark's scope: the wait checks it.
    q.enqueue(&[item("old-done")]).unwrap();
    let all = q.mark().unwrap();
    let claimed = q.claim(far_future(), 10).unwrap();
    for c in &claimed {
        q.complete(c, &Outcome::Done).unwrap();
    }
    assert_eq!(q.mark().unwrap(), all);
    assert_eq!(names(q.scope(Some(upto)).unwrap()), ["later", "old-done"]);
    assert!(q.scope(None).unwrap().is_empty());
}

#[test]
fn expediting_makes_backed_off_items_in_range_due_now() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    q.enqueue(&[item("before")]).unwrap();
    let mark = q.mark().unwrap();
    q.enqueue(&[item("after")]).unwrap();
    let later = Outcome::RetryIn {
        wait: Duration::from_secs(3600),
        error: "503".into(),
    };
    for c in q.claim(now_ms(), 10).unwrap() {
        q.complete(&c, &later).unwrap();
    }
    assert!(q.claim(now_ms(), 10).unwrap().is_empty());
    assert_eq!(q.expedite(Some(mark), q.mark().unwrap()).unwrap(), 1);
    let due = q.claim(now_ms(), 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].item.name, "after");
    assert_eq!(due[0].attempts, 1, "expediting counts no attempt");
}

/// Regression: with the daemon down, every build's hook opens the queue, commits one item and
/// closes. The WAL used to be left behind at each close, and since no connection outlived a
/// commit, SQLite never reset it: it grew by about 14 KiB per build, and every hook re-read all of
/// it on opening (3 ms per hook at first, 9 ms after 1,000 builds, without bound).
#[test]
fn the_wal_stays_bounded_when_each_writer_opens_commits_and_closes() {
    let d = tempfile::tempdir().unwrap();
    let wal = d.path().join("queue.sqlite-wal");
    for i in 0..300 {
        Queue::open(d.path())
            .unwrap()
            .enqueue(&[item(&format!("p{i}"))])
            .unwrap();
    }
    let wal_size = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert!(
        wal_size < 64 << 10,
        "WAL is {wal_size} bytes after 300 hooks"
    );
    let status = Queue::open(d.path()).unwrap().status(0).unwrap();
    assert!(status.counts.contains(&(State::Queued, 300)), "{status:?}");
}

#[test]
fn claims_are_exclusive_and_recovery_returns_them() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    let mut q2 = Queue::open(d.path()).unwrap();
    q.enqueue(&[item("a"), item("b"), item("c")]).unwrap();
    let first = q.claim(far_future(), 2).unwrap();
    let second = q2.claim(far_future(), 10).unwrap();
    assert_eq!(first.len() + second.len(), 3);
    assert!(q2.claim(far_future(), 10).unwrap().is_empty());
    // A crash: nothing completed. Recovery puts everything back.
    drop(q);
    assert_eq!(q2.recover().unwrap(), 3);
    assert_eq!(q2.claim(far_future(), 10).unwrap().len(), 3);
}

/// A daemon that stops before its attempts end puts exactly those items back, due at once and with
/// no attempt counted; the ones it finished stay finished.
#[test]
fn requeued_items_are_due_again_without_an_attempt_counted() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    q.enqueue(&[item("a"), item("b"), item("c")]).unwrap();
    let claimed = q.claim(now_ms(), 10).unwrap();
    q.complete(&claimed[0], &Outcome::Done).unwrap();
    let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(q.requeue(&ids).unwrap(), 2, "the done one is not requeued");
    let again = q.claim(now_ms(), 10).unwrap();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|c| c.attempts == 0));
    let names = ["a", "b", "c", "d"].map(String::from);
    let mut pending = q.pending_among(&names).unwrap();
    pending.sort();
    assert_eq!(pending, ["b", "c"]);
}

/// Pruning forgets old finished rows and superseded failures, and nothing that still matters:
/// pending items, failures to act on, recent history.
#[test]
fn pruning_forgets_old_history_and_keeps_what_matters() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    q.enqueue(&[
        item("done"),
        item("gone"),
        item("failed"),
        item("superseded"),
    ])
    .unwrap();
    let claimed = q.claim(now_ms(), 10).unwrap();
    let outcome = |name: &str| match name {
        "done" => Outcome::Done,
        "gone" => Outcome::Gone("collected".into()),
        _ => Outcome::Failed("broken".into()),
    };
    for c in &claimed {
        q.complete(c, &outcome(&c.item.name)).unwrap();
    }
    // Queued again and published: its failure is history.
    q.enqueue(&[item("superseded"), item("pending")]).unwrap();
    let again = q.claim(now_ms(), 10).unwrap();
    let superseded = again.iter().find(|c| c.item.name == "superseded").unwrap();
    q.complete(superseded, &Outcome::Done).unwrap();

    // Nothing is old enough yet.
    assert_eq!(q.prune(0, 100).unwrap(), 0);
    // Everything finished before now goes, two rows at a time; the failure to act on and the
    // pending item stay.
    let later = now_ms() + 1;
    assert_eq!(q.prune(later, 2).unwrap(), 2);
    assert_eq!(q.prune(later, 2).unwrap(), 2);
    assert_eq!(q.prune(later, 2).unwrap(), 0);
    let failed = q.failed().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, "failed");
    let mut left: Vec<(String, State)> = q.items().unwrap();
    left.sort();
    assert_eq!(
        left,
        [
            ("failed".to_owned(), State::Failed),
            ("pending".to_owned(), State::InFlight)
        ]
    );
}

#[test]
fn retries_wait_their_turn_and_failures_can_be_retried() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    q.enqueue(&[item("a"), item("b")]).unwrap();
    let c = q.claim(far_future(), 10).unwrap();
    let t = c[0].enqueued_at;
    q.complete(
        &c[0],
        &Outcome::RetryIn {
            wait: Duration::from_secs(60),
            error: "endpoint down".into(),
        },
    )
    .unwrap();
    q.complete(&c[1], &Outcome::Failed("corrupt".into()))
        .unwrap();
    let due = q.next_due(now_ms()).unwrap().unwrap();
    assert!(due >= t + 60_000, "{due}");
    assert!(q.claim(due - 1, 10).unwrap().is_empty(), "not due yet");
    let again = q.claim(due, 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].retry_waited, Duration::from_secs(60));

    let s = q.status(10).unwrap();
    assert!(s.counts.contains(&(State::Failed, 1)) && s.counts.contains(&(State::InFlight, 1)));
    let mut errors: Vec<&str> = s.recent_errors.iter().map(|e| e.3.as_str()).collect();
    errors.sort();
    assert_eq!(errors, vec!["corrupt", "endpoint down"]);
    assert_eq!(q.retry_failed(Some(&["b".to_owned()])).unwrap(), 1);
    let b = q.claim(far_future(), 10).unwrap();
    assert_eq!((b[0].item.name.as_str(), b[0].attempts), ("b", 0));
}

#[test]
fn concurrent_writers_lose_nothing() {
    let d = tempfile::tempdir().unwrap();
    Queue::open(d.path()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let dir = d.path().to_owned();
            std::thread::spawn(move || {
                let mut q = Queue::open(&dir).unwrap();
                for i in 0..50 {
                    q.enqueue(&[item(&format!("t{t}-{i}")), item("shared")])
                        .unwrap();
                }
            })
        })
        .collect();
    // A claimer runs at the same time, as the daemon would.
    let mut q = Queue::open(d.path()).unwrap();
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.extend(q.claim(far_future(), 7).unwrap());
    }
    for t in threads {
        t.join().unwrap();
    }
    seen.extend(q.claim(far_future(), 10_000).unwrap());
    let mut names: Vec<String> = seen.iter().map(|c| c.item.name.clone()).collect();
    names.sort();
    let unique = names.len();
    names.dedup();
    assert_eq!(
        names.len(),
        unique,
        "an item was claimed twice while pending"
    );
    for t in 0..8 {
        for i in 0..50 {
            assert!(
                names.binary_search(&format!("t{t}-{i}")).is_ok(),
                "t{t}-{i} lost"
            );
        }
    }
}

/// Regression (found by the model test in about 7% of runs): `retry --all` requeued the failed row
/// of an item that had been queued again and published since.
#[test]
fn a_failure_published_since_is_not_retried_or_counted() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    q.enqueue(&[item("a")]).unwrap();
    let c = q.claim(far_future(), 10).unwrap();
    q.complete(&c[0], &Outcome::Failed("denied".into()))
        .unwrap();
    q.enqueue(&[item("a")]).unwrap();
    assert_eq!(q.retry_failed(None).unwrap(), 0, "pending again");
    let c = q.claim(far_future(), 10).unwrap();
    q.complete(&c[0], &Outcome::Done).unwrap();
    assert_eq!(q.retry_failed(None).unwrap(), 0, "published since");
    assert_eq!(q.retry_failed(Some(&["a".to_owned()])).unwrap(), 0);
    let s = q.status(10).unwrap();
    assert!(s.counts.contains(&(State::Failed, 0)), "{:?}", s.counts);
    assert!(q.claim(far_future(), 10).unwrap().is_empty());
}

/// Regression: the give-up clock was wall time since the first failure, so a builder resumed
/// after a weekend's suspend (or a daemon down that long) gave up on every item at its next
/// attempt; and a clock stepped back by days left retries waiting for days.
#[test]
fn retry_time_counts_scheduled_waits_and_survives_clock_steps() {
    let d = tempfile::tempdir().unwrap();
    let mut q = Queue::open(d.path()).unwrap();
    q.enqueue(&[item("a")]).unwrap();
    let mut waited = Duration::ZERO;
    for wait in [1, 2, 4] {
        let c = q.claim(far_future(), 10).unwrap();
        assert_eq!(c[0].retry_waited, waited);
        q.complete(
            &c[0],
            &Outcome::RetryIn {
                wait: Duration::from_secs(wait),
                error: "down".into(),
            },
        )
        .unwrap();
        waited += Duration::from_secs(wait);
    }
    // Claimed a weekend later: 7 s of waits, whatever the wall clock says.
    let weekend = now_ms() + 3 * 24 * 3600 * 1000;
    let c = q.claim(weekend, 10).unwrap();
    assert_eq!(c[0].retry_waited, Duration::from_secs(7));
    q.complete(
        &c[0],
        &Outcome::RetryIn {
            wait: Duration::from_secs(3600),
            error: "down".into(),
        },
    )
    .unwrap();
    // The clock steps back ten days: the hour-long wait was scheduled "in the future", so the
    // item is due now rather than in ten days.
    let stepped_back = now_ms() - 10 * 24 * 3600 * 1000;
    assert_eq!(q.next_due(stepped_back).unwrap(), Some(stepped_back));
    assert_eq!(q.claim(stepped_back, 10).unwrap().len(), 1);
}

/// A queue written by an earlier version (without `retry_waited_ms`) opens and keeps its items.
#[test]
fn a_queue_from_before_retry_waited_opens_with_its_items() {
    let d = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(d.path().join("queue.sqlite")).unwrap();
        conn.execute_batch(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, item TEXT NOT NULL, kind TEXT NOT NULL,
               state TEXT NOT NULL, enqueued_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
               next_attempt_at INTEGER NOT NULL, first_failure_at INTEGER, last_error TEXT,
               updated_at INTEGER NOT NULL);
             INSERT INTO items (item, kind, state, enqueued_at, attempts, next_attempt_at, updated_at)
               VALUES ('old', 'path', 'queued', 1, 2, 1, 1);",
        )
        .unwrap();
    }
    // Hooks open the queue many at once: each must see the upgrade done exactly once.
    let opened: Vec<_> = (0..8)
        .map(|_| {
            let dir = d.path().to_owned();
            std::thread::spawn(move || Queue::open(&dir).map(drop))
        })
        .collect();
    for o in opened {
        o.join().unwrap().unwrap();
    }
    let mut q = Queue::open(d.path()).unwrap();
    let c = q.claim(far_future(), 10).unwrap();
    assert_eq!((c[0].item.name.as_str(), c[0].attempts), ("old", 2));
    assert_eq!(c[0].retry_waited, Duration::ZERO);
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue(Vec<u8>),
    Claim(usize),
    Complete(usize, u8),
    Recover,
    Retry,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        proptest::collection::vec(0u8..6, 1..4).prop_map(Op::Enqueue),
        (1usize..4).prop_map(Op::Claim),
        (0usize..8, 0u8..4).prop_map(|(i, o)| Op::Complete(i, o)),
        Just(Op::Recover),
        Just(Op::Retry),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The queue behaves like a simple model: per name, at most one pending entry; every enqueued
    /// name is pending until completed with a final outcome.
    #[test]
    fn behaves_like_the_model(ops in proptest::collection::vec(arb_op(), 1..40)) {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path()).unwrap();
        // name -> pending state (Queued or InFlight); finals are counted.
        let mut model: HashMap<String, State> = HashMap::new();
        let mut failed: Vec<String> = Vec::new();
        let mut held: Vec<Claimed> = Vec::new();
        for op in ops {
            match op {
                Op::Enqueue(ns) => {
                    let items: Vec<Item> = ns.iter().map(|n| item(&format!("p{n}"))).collect();
                    let added = q.enqueue(&items).unwrap();
                    let mut expect = 0;
                    for it in &items {
                        if !model.contains_key(&it.name) {
                            model.insert(it.name.clone(), State::Queued);
                            expect += 1;
                        }
                        // The new row supersedes the failure.
                        failed.retain(|f| *f != it.name);
                    }
                    prop_assert_eq!(added, expect);
                }
                Op::Claim(n) => {
                    let c = q.claim(far_future(), n).unwrap();
                    let queued = model.values().filter(|s| **s == State::Queued).count();
                    prop_assert_eq!(c.len(), n.min(queued));
                    for x in &c {
                        prop_assert_eq!(model.insert(x.item.name.clone(), State::InFlight), Some(State::Queued));
                    }
                    held.extend(c);
                }
                Op::Complete(i, o) if !held.is_empty() => {
                    let c = held.remove(i % held.len());
                    let outcome = match o {
                        0 => Outcome::Done,
                        1 => Outcome::Gone("gc".into()),
                        2 => Outcome::Failed("bad".into()),
                        _ => Outcome::RetryIn { wait: Duration::ZERO, error: "later".into() },
                    };
                    q.complete(&c, &outcome).unwrap();
                    if o == 3 {
                        model.insert(c.item.name.clone(), State::Queued);
                    } else {
                        model.remove(&c.item.name);
                        if o == 2 { failed.push(c.item.name.clone()); }
                    }
                }
                Op::Complete(..) => {}
                Op::Recover => {
                    let n = q.recover().unwrap();
                    prop_assert_eq!(n, held.len());
                    held.clear();
                    for s in model.values_mut() { *s = State::Queued; }
                }
                Op::Retry => {
                    let n = q.retry_failed(None).unwrap();
                    let expect = failed.len();
                    for f in failed.drain(..) {
                        prop_assert!(model.insert(f, State::Queued).is_none());
                    }
                    prop_assert_eq!(n, expect);
                }
            }
            let status = q.status(0).unwrap();
            let count = |s: State| status.counts.iter().find(|(x, _)| *x == s).map_or(0, |(_, n)| *n as usize);
            prop_assert_eq!(count(State::Failed), failed.len());
            let pending: usize = q.status(0).unwrap().counts.iter()
                .filter(|(s, _)| matches!(s, State::Queued | State::InFlight)).map(|(_, n)| *n as usize).sum();
            prop_assert_eq!(pending, model.len());
        }
    }
}
