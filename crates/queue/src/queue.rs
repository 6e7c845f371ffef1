use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QueueError {
    #[error("queue database {}: {source}", path.display())]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the state directory {}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an item names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A store path to publish with its closure.
    Path,
    /// A derivation whose outputs are to be resolved, then published (the hook got no `OUT_PATHS`).
    Derivation,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Path => "path",
            Kind::Derivation => "drv",
        }
    }

    pub(crate) fn parse(s: &str) -> Kind {
        if s == "drv" {
            Kind::Derivation
        } else {
            Kind::Path
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Item {
    pub name: String,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Queued,
    InFlight,
    Done,
    Failed,
    Gone,
}

impl State {
    fn parse(s: &str) -> State {
        State::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .unwrap_or(State::Queued)
    }

    pub const ALL: [State; 5] = [
        State::Queued,
        State::InFlight,
        State::Done,
        State::Failed,
        State::Gone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::InFlight => "in_flight",
            State::Done => "done",
            State::Failed => "failed",
            State::Gone => "gone",
        }
    }
}

/// A claimed item, to be completed by whoever claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub id: i64,
    pub item: Item,
    /// Failed attempts so far.
    pub attempts: u32,
    pub enqueued_at: i64,
    /// The backoff waits scheduled for it so far: how long it has been retried, counted in the
    /// queue's own time, so that neither a suspended machine nor a clock step nor a daemon that was
    /// down for a weekend makes every item give up at once.
    pub retry_waited: Duration,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Gone(String),
    /// Failed; try again after this wait.
    RetryIn {
        wait: Duration,
        error: String,
    },
    Failed(String),
}

/// Where an item stands: its latest row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    pub state: State,
    /// Failed attempts so far.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When it is next due (Unix ms), if queued.
    pub next_attempt_at: i64,
    /// The number of the last request that named it.
    pub requested: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub counts: Vec<(State, u64)>,
    /// `enqueued_at` of the oldest queued or in-flight item.
    pub oldest_pending: Option<i64>,
    /// Most recent errors first: (item, state, attempts, error, updated_at).
    pub recent_errors: Vec<(String, State, u32, String, i64)>,
}

pub fn now_ms() -> i64 {
    ms_of(SystemTime::now())
}

/// `t` on the queue's clock: milliseconds since the Unix epoch.
pub fn ms_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

pub struct Queue {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    item TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    enqueued_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    first_failure_at INTEGER,
    last_error TEXT,
    updated_at INTEGER NOT NULL,
    retry_waited_ms INTEGER NOT NULL DEFAULT 0,
    via TEXT,
    requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS items_pending ON items(item) WHERE state IN ('queued', 'in_flight');
CREATE INDEX IF NOT EXISTS items_due ON items(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS items_by_name ON items(item, id);
";

/// Made once the `requested` column exists (older databases gain it after [`SCHEMA`] runs).
const REQUESTED_INDEX: &str = "CREATE INDEX IF NOT EXISTS items_requested ON items(requested);";

/// Columns added after the first release (also in [`SCHEMA`]), with their definitions; added to
/// older databases on open.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("retry_waited_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("via", "TEXT"),
    ("requested", "INTEGER NOT NULL DEFAULT 0"),
];

/// A failed row that a newer row of the same item supersedes (it was queued again, and is pending
/// or finished) is history, not a failure to act on.
const SUPERSEDED: &str =
    "EXISTS (SELECT 1 FROM items newer WHERE newer.item = items.item AND newer.id > items.id)";

/// How long an opener or writer waits for another process's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl Queue {
    /// Opens (creating if needed) `state_dir/queue.sqlite`.
    pub fn open(state_dir: &Path) -> Result<Queue, QueueError> {
        crate::owner::create_dir_all(state_dir).map_err(|source| QueueError::StateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join("queue.sqlite");
        // A new database keeps a rollback journal until an opener switches it to WAL. There,
        // SQLite answers a lock upgrade that could deadlock with "database is locked" at once,
        // without waiting (CI met it with 64 hooks creating the queue together): such an opener
        // starts again, within the time it would have waited for the lock.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            match Self::open_at(&path) {
                Err(QueueError::Db { source, .. })
                    if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                opened => return opened,
            }
        }
    }

    fn open_at(path: &Path) -> Result<Queue, QueueError> {
        let err = |source| QueueError::Db {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        // Several processes (hooks, daemon, status) share the file: wait for each other's locks.
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        // The last connection to close checkpoints the WAL and removes it (SQLite's default; keep
        // it). Hooks with the daemon down each open, commit once and close: a WAL left behind is
        // never reset, since the checkpoint progress lives in shared memory that the next opener
        // rebuilds by reading the whole WAL. With the daemon up, its connection stays open and a
        // hook's close costs nothing.
        conn.execute_batch(SCHEMA).map_err(err)?;
        let mut queue = Queue {
            conn,
            path: path.to_owned(),
        };
        queue.add_missing_columns()?;
        queue
            .conn
            .execute_batch(REQUESTED_INDEX)
            .map_err(queue.err())?;
        // The hook (root) may create the database before a daemon running as its own user ever
        // did: the daemon must still be able to write it.
        for suffix in ["", "-wal", "-shm"] {
            let mut file = queue.path.clone().into_os_string();
            file.push(suffix);
            crate::owner::give_to_dir_owner(Path::new(&file));
        }
        Ok(queue)
    }

    /// Brings a database made by an earlier version up to the current columns. In one write
    /// transaction: hooks open the queue concurrently, and only one of them may add a column.
    fn add_missing_columns(&mut self) -> Result<(), QueueError> {
        let columns = |conn: &Connection| -> rusqlite::Result<Vec<String>> {
            conn.prepare("SELECT name FROM pragma_table_info('items')")?
                .query_map([], |r| r.get(0))?
                .collect()
        };
        let present = columns(&self.conn).map_err(self.err())?;
        if ADDED_COLUMNS
            .iter()
            .all(|(c, _)| present.iter().any(|p| p == c))
        {
            return Ok(());
        }
        self.write(|tx| {
            let present = columns(tx)?;
            for (column, definition) in ADDED_COLUMNS {
                if !present.iter().any(|p| p == column) {
                    tx.execute_batch(&format!(
                        "ALTER TABLE items ADD COLUMN {column} {definition}"
                    ))?;
                }
            }
            Ok(())
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> QueueError + '_ {
        move |source| QueueError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` in an immediate (write-locking) transaction and commits it: the one way this queue
    /// writes several rows, so each operation is all or nothing and costs one durable commit.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, QueueError> {
        let conn = &mut self.conn;
        let result = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })();
        result.map_err(|source| QueueError::Db {
            path: self.path.clone(),
            source,
        })
    }

    /// Records items durably; returns how many were new (not already pending).
    pub fn enqueue(&mut self, items: &[Item]) -> Result<usize, QueueError> {
        self.enqueue_via(items, None)
    }

    /// [`Queue::enqueue`], noting how the items came when it was not through the daemon's socket:
    /// `via` names the hook's fallback (it wrote the queue itself, or the daemon imported its spill).
    ///
    /// Each call is one request: it takes the next request number, and every item it names, new or
    /// already pending, is stamped with it (see [`Queue::mark`]).
    pub fn enqueue_via(&mut self, items: &[Item], via: Option<&str>) -> Result<usize, QueueError> {
        let now = now_ms();
        self.write(|tx| {
            let request: i64 = tx.query_row(
                "INSERT INTO counters (name, value) VALUES ('requests', 1)
                 ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
                [],
                |r| r.get(0),
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO items (item, kind, state, enqueued_at, next_attempt_at, updated_at, via, requested)
                 VALUES (?1, ?2, 'queued', ?3, ?3, ?3, ?4, ?5)",
            )?;
            let mut restamp = tx.prepare_cached(
                "UPDATE items SET requested = ?2 WHERE item = ?1 AND state IN ('queued', 'in_flight')",
            )?;
            let mut added = 0;
            for it in items {
                match insert.execute(params![it.name, it.kind.as_str(), now, via, request])? {
                    0 => {
                        restamp.execute(params![it.name, request])?;
                    }
                    n => added += n,
                }
            }
            Ok(added)
        })
    }

    /// The number of the last request recorded: items requested after this call carry a larger one.
    /// `nixpush mark` prints it, and `wait --since` waits for what was requested after it.
    pub fn mark(&self) -> Result<u64, QueueError> {
        self.conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'requests'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0).max(0) as u64)
            .map_err(self.err())
    }

    /// What a wait answers for: the items last requested after `since` (all of them, published or
    /// not), or with no `since`, every item not yet published (queued, in flight, or failed and not
    /// superseded). Oldest first. Items requested while the wait runs may be among them: a request
    /// renumbers the pending row it joins, so bounding the scope by the wait's own mark could drop
    /// an item asked for before it; waiting for more is safe, missing one is not.
    pub fn scope(&self, since: Option<u64>) -> Result<Vec<Item>, QueueError> {
        self.items_where(
            &format!(
                "(?1 IS NOT NULL AND requested > ?1 AND NOT {SUPERSEDED})
                 OR (?1 IS NULL AND (state IN ('queued', 'in_flight')
                                     OR (state = 'failed' AND NOT {SUPERSEDED})))"
            ),
            params![since.map(|s| s as i64)],
        )
    }

    /// The latest row of `name`: where that item stands now.
    pub fn latest(&self, name: &str) -> Result<Option<Latest>, QueueError> {
        self.conn
            .prepare_cached(
                "SELECT state, attempts, last_error, next_attempt_at, requested FROM items
                 WHERE item = ?1 ORDER BY id DESC LIMIT 1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([name], |r| {
                    let state: String = r.get(0)?;
                    Ok(Latest {
                        state: State::parse(&state),
                        attempts: r.get(1)?,
                        last_error: r.get(2)?,
                        next_attempt_at: r.get(3)?,
                        requested: r.get::<_, i64>(4)?.max(0) as u64,
                    })
                })
                .optional()
            })
            .map_err(self.err())
    }

    /// Makes queued items last requested in `(since, upto]` due now, however long their backoff
    /// still had to run: someone is waiting for them. Returns how many.
    pub fn expedite(&mut self, since: Option<u64>, upto: u64) -> Result<usize, QueueError> {
        let now = now_ms();
        self.write(|tx| {
            tx.execute(
                "UPDATE items SET next_attempt_at = ?1
                 WHERE state = 'queued' AND next_attempt_at > ?1 AND requested > ?2 AND requested <= ?3",
                // Rows from before requests were numbered carry 0: with no `since`, they count.
                params![now, since.map_or(-1, |s| s as i64), upto as i64],
            )
        })
    }

    /// How many items each of the hook's fallbacks recorded (see [`Queue::enqueue_via`]).
    pub fn fallbacks(&self) -> Result<Vec<(String, u64)>, QueueError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT via, COUNT(*) FROM items WHERE via IS NOT NULL GROUP BY via ORDER BY via",
            )
            .map_err(self.err())?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())
    }

    /// Hands out up to `limit` queued items due by `now` (Unix ms), marking them in flight. An item
    /// scheduled at a time later than `now` is due all the same: the clock went back past
    /// the moment its wait was scheduled, so its schedule says nothing any more.
    pub fn claim(&mut self, now: i64, limit: usize) -> Result<Vec<Claimed>, QueueError> {
        self.write(|tx| {
            let claimed: Vec<Claimed> = tx
                .prepare_cached(
                    "SELECT id, item, kind, attempts, enqueued_at, retry_waited_ms FROM items
                     WHERE state = 'queued' AND (next_attempt_at <= ?1 OR updated_at > ?1)
                     ORDER BY next_attempt_at, id LIMIT ?2",
                )?
                .query_map(params![now, limit as i64], |r| {
                    Ok(Claimed {
                        id: r.get(0)?,
                        item: Item {
                            name: r.get(1)?,
                            kind: Kind::parse(&r.get::<_, String>(2)?),
                        },
                        attempts: r.get(3)?,
                        enqueued_at: r.get(4)?,
                        retry_waited: Duration::from_millis(r.get::<_, i64>(5)?.max(0) as u64),
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut update = tx.prepare_cached(
                "UPDATE items SET state = 'in_flight', updated_at = ?2 WHERE id = ?1",
            )?;
            let updated = now_ms();
            for c in &claimed {
                update.execute(params![c.id, updated])?;
            }
            Ok(claimed)
        })
    }

    /// Records how the attempt on a claimed item ended.
    pub fn complete(&mut self, claimed: &Claimed, outcome: &Outcome) -> Result<(), QueueError> {
        self.complete_all(&[(claimed, outcome)])
    }

    /// Records the outcomes of a batch in one transaction: one durable write for the lot, so a
    /// batch does not hold up the hooks' enqueues with a write per item.
    pub fn complete_all(&mut self, done: &[(&Claimed, &Outcome)]) -> Result<(), QueueError> {
        let now = now_ms();
        self.write(|tx| {
            for (claimed, outcome) in done {
                let (sql, args): (&str, Vec<rusqlite::types::Value>) = match outcome {
                    Outcome::Done => {
                        ("UPDATE items SET state = 'done', last_error = NULL, updated_at = ?2 WHERE id = ?1", vec![])
                    }
                    Outcome::Gone(why) => (
                        "UPDATE items SET state = 'gone', last_error = ?3, updated_at = ?2 WHERE id = ?1",
                        vec![why.clone().into()],
                    ),
                    Outcome::Failed(error) => (
                        "UPDATE items SET state = 'failed', attempts = attempts + 1, last_error = ?3,
                         first_failure_at = COALESCE(first_failure_at, ?2), updated_at = ?2 WHERE id = ?1",
                        vec![error.clone().into()],
                    ),
                    Outcome::RetryIn { wait, error } => {
                        let wait = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
                        (
                            "UPDATE items SET state = 'queued', attempts = attempts + 1, last_error = ?3,
                             first_failure_at = COALESCE(first_failure_at, ?2),
                             next_attempt_at = ?2 + ?4, retry_waited_ms = retry_waited_ms + ?4,
                             updated_at = ?2 WHERE id = ?1",
                            vec![error.clone().into(), wait.into()],
                        )
                    }
                };
                let mut all: Vec<rusqlite::types::Value> = vec![claimed.id.into(), now.into()];
                all.extend(args);
                tx.prepare_cached(sql)?.execute(rusqlite::params_from_iter(all))?;
            }
            Ok(())
        })
    }

    /// Puts in-flight items back in the queue: after a crash (nothing is in flight when no daemon
    /// runs) or when the daemon stops before finishing them. Returns how many.
    pub fn recover(&mut self) -> Result<usize, QueueError> {
        self.conn
            .execute(
                "UPDATE items SET state = 'queued', updated_at = ?1 WHERE state = 'in_flight'",
                params![now_ms()],
            )
            .map_err(self.err())
    }

    /// Puts claimed items back in the queue, due now and with no attempt counted: the daemon
    /// stopped before their attempt ended. Returns how many were still in flight.
    pub fn requeue(&mut self, ids: &[i64]) -> Result<usize, QueueError> {
        let now = now_ms();
        self.write(|tx| {
            let mut update = tx.prepare_cached(
                "UPDATE items SET state = 'queued', next_attempt_at = ?2, updated_at = ?2
                 WHERE id = ?1 AND state = 'in_flight'",
            )?;
            ids.iter().map(|id| update.execute(params![id, now])).sum()
        })
    }

    /// Forgets finished history last updated before `before` (Unix ms), at most `limit` rows in one
    /// transaction: failed rows that a newer row of their item supersedes, then `done` and `gone`
    /// rows. A superseded failure always ended before the row that supersedes it, so removing that
    /// row never makes an old failure count again. Returns how many rows went; fewer than `limit`
    /// means there is nothing more to prune.
    pub fn prune(&mut self, before: i64, limit: usize) -> Result<usize, QueueError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write(|tx| {
            let superseded = tx
                .prepare_cached(&format!(
                    "DELETE FROM items WHERE id IN
                     (SELECT id FROM items WHERE state = 'failed' AND updated_at < ?1
                      AND {SUPERSEDED} LIMIT ?2)"
                ))?
                .execute(params![before, limit])?;
            let finished = tx
                .prepare_cached(
                    "DELETE FROM items WHERE id IN
                     (SELECT id FROM items WHERE state IN ('done', 'gone') AND updated_at < ?1
                      LIMIT ?2)",
                )?
                .execute(params![before, limit - superseded as i64])?;
            Ok(superseded + finished)
        })
    }

    /// Which of `names` are queued or in flight (each looked up by the index, whatever the backlog).
    pub fn pending_among(&self, names: &[String]) -> Result<Vec<String>, QueueError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT 1 FROM items WHERE item = ?1 AND state IN ('queued', 'in_flight') LIMIT 1",
            )
            .map_err(self.err())?;
        let mut pending = Vec::new();
        for name in names {
            if stmt.exists([name]).map_err(self.err())? {
                pending.push(name.clone());
            }
        }
        Ok(pending)
    }

    /// Requeues failed items (all of them, or those named), due now, with their attempt count reset.
    /// A failed row that a newer row of its item supersedes is left alone: that item is pending
    /// again (the pending row will do the work) or was published since.
    pub fn retry_failed(&mut self, names: Option<&[String]>) -> Result<usize, QueueError> {
        let now = now_ms();
        self.write(|tx| {
            let mut update = tx.prepare_cached(&format!(
                "UPDATE OR IGNORE items SET state = 'queued', attempts = 0, first_failure_at = NULL,
                 retry_waited_ms = 0, next_attempt_at = ?1, updated_at = ?1
                 WHERE state = 'failed' AND (?2 IS NULL OR item = ?2) AND NOT {SUPERSEDED}"
            ))?;
            match names {
                None => update.execute(params![now, Option::<String>::None]),
                Some(names) => names.iter().map(|n| update.execute(params![now, n])).sum(),
            }
        })
    }

    /// When the next queued item becomes due (Unix ms), if any is queued; `now` for an item whose
    /// schedule a clock step made meaningless (see [`Queue::claim`]).
    pub fn next_due(&self, now: i64) -> Result<Option<i64>, QueueError> {
        self.conn
            .query_row(
                "SELECT MIN(CASE WHEN updated_at > ?1 THEN ?1 ELSE next_attempt_at END)
                 FROM items WHERE state = 'queued'",
                [now],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(self.err())
    }

    pub fn status(&self, recent: usize) -> Result<Status, QueueError> {
        let mut status = Status::default();
        for state in State::ALL {
            // Failed rows superseded by a newer row of their item are not failures any more.
            let n: i64 = self
                .conn
                .query_row(
                    &format!(
                        "SELECT COUNT(*) FROM items WHERE state = ?1 AND (state != 'failed' OR NOT {SUPERSEDED})"
                    ),
                    [state.as_str()],
                    |r| r.get(0),
                )
                .map_err(self.err())?;
            status.counts.push((state, n as u64));
        }
        status.oldest_pending = self
            .conn
            .query_row(
                "SELECT MIN(enqueued_at) FROM items WHERE state IN ('queued', 'in_flight')",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT item, state, attempts, last_error, updated_at FROM items
                 WHERE last_error IS NOT NULL AND state IN ('queued', 'in_flight', 'failed', 'gone')
                 ORDER BY updated_at DESC, id DESC LIMIT ?1",
            )
            .map_err(self.err())?;
        status.recent_errors = stmt
            .query_map([recent as i64], |r| {
                let state = State::parse(&r.get::<_, String>(1)?);
                Ok((r.get(0)?, state, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        Ok(status)
    }

    /// Every failed item that no newer row supersedes: (item, attempts, error, updated_at), most
    /// recent first.
    pub fn failed(&self) -> Result<Vec<(String, u32, String, i64)>, QueueError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT item, attempts, COALESCE(last_error, ''), updated_at FROM items
                 WHERE state = 'failed' AND NOT {SUPERSEDED} ORDER BY updated_at DESC, id DESC"
            ))
            .map_err(self.err())?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())
    }

    /// The items queued or in flight, oldest first.
    pub fn pending(&self) -> Result<Vec<Item>, QueueError> {
        self.items_where("state IN ('queued', 'in_flight')", [])
    }

    /// The items of the rows `condition` selects, oldest first.
    fn items_where(
        &self,
        condition: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<Item>, QueueError> {
        let sql = format!("SELECT item, kind FROM items WHERE {condition} ORDER BY id");
        let mut stmt = self.conn.prepare(&sql).map_err(self.err())?;
        stmt.query_map(args, |r| {
            Ok(Item {
                name: r.get(0)?,
                kind: Kind::parse(&r.get::<_, String>(1)?),
            })
        })
        .map_err(self.err())?
        .collect::<Result<_, _>>()
        .map_err(self.err())
    }

    /// Every row's item and state, oldest first.
    pub fn items(&self) -> Result<Vec<(String, State)>, QueueError> {
        let mut stmt = self
            .conn
            .prepare("SELECT item, state FROM items ORDER BY id")
            .map_err(self.err())?;
        stmt.query_map([], |r| {
            Ok((r.get(0)?, State::parse(&r.get::<_, String>(1)?)))
        })
        .map_err(self.err())?
        .collect::<Result<_, _>>()
        .map_err(self.err())
    }
}
