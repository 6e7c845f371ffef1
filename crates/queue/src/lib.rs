//! The durable upload queue.
//!
//! One SQLite database (WAL mode) in the state directory, written by the daemon and, when the daemon
//! cannot be reached, by the hook itself; `status` and `retry` use it too. It knows nothing of Nix
//! or S3: an item is a string (a store path, or a derivation whose outputs are still to be
//! resolved) and a state.
//!
//! ```text
//!   enqueue ──> queued ──claim──> in_flight ──> done      (published, or proven already there)
//!                 ^                   │    └──> gone      (no longer in the store: nothing to do)
//!                 │                   ├──> queued         (retry: attempts+1, next_attempt later)
//!                 └── retry ── failed <┘                   (gave up; the reason is kept)
//! ```
//!
//! Invariants (each tested):
//! 1. **Durable before acknowledged.** `enqueue` returns only after its transaction is committed with
//!    `synchronous=FULL`: a power cut after it returns loses nothing.
//! 2. **Nothing is lost.** Items leave `queued`/`in_flight` only through `complete` with a final
//!    outcome (done, gone, failed). A crash leaves claimed items `in_flight`; `recover` puts them
//!    back. No operation deletes a row.
//! 3. **Queued duplicates collapse.** At most one row per item is `queued` or `in_flight`; enqueueing
//!    it again adds nothing. (A finished item enqueued again is new work: it gets a new row.)
//! 4. **Claims are exclusive.** An item is handed to one claimer until it is completed or recovered,
//!    even with several processes using the database at once.
//!
//! 5. **A newer row supersedes a failed one.** An item that failed and was queued again is counted
//!    and retried through its newer row only; `retry` never resurrects a failure that a later
//!    attempt published.
//! 6. **Retry timing survives clock steps.** How long an item has been retried is the sum of the
//!    waits scheduled for it (`retry_waited_ms`), not wall time since its first failure; an item
//!    scheduled after a moment the clock has gone back past is due at once.
//! 7. **Requests are numbered.** Each enqueue takes the next request number and stamps every item
//!    it names with it, pending duplicates included; a mark (the last number) therefore splits
//!    what was asked for before it from what was asked for after, which `wait --since` relies on.
//!
//! [`spill`] is the hook's second recording place, for when this database cannot be written.
//!
//! Layout: table `items(id, item, kind, state, enqueued_at, attempts, next_attempt_at,
//! first_failure_at, last_error, updated_at, retry_waited_ms, via, requested)`, times in Unix
//! milliseconds; a partial unique index on `item` over the pending states enforces invariant 3;
//! `counters('requests', n)` holds the last request number.

pub mod owner;
mod queue;
mod retry;
pub mod spill;

pub use queue::{
    Claimed, Item, Kind, Latest, Outcome, Queue, QueueError, State, Status, ms_of, now_ms,
};
pub use retry::{Decision, RetryPolicy};
