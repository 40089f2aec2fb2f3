//! The checkpoint thread's work: copying the write-ahead log into the database file off the
//! writer's path, and keeping the log bounded.
//!
//! The writer's connection never checkpoints (`wal_autocheckpoint=0`): with SQLite's
//! automatic checkpoint, the commit that crosses the threshold copies the log into the
//! database and syncs it before its producers get their 200s. Here a connection of its own
//! does the copying instead, on SQLite's documented checkpoint modes
//! (sqlite.org/c3ref/wal_checkpoint_v2.html):
//!
//! - **PASSIVE, every [`PASS_EVERY`] commits.** It takes no lock a writer or reader waits
//!   for; it copies every frame no reader still needs. Under steady load it never finishes the log, as new
//!   commits land while it copies, but it keeps what is left to copy small.
//! - **RESTART, once the log passes [`RESTART_BYTES`].** The log only starts over from its
//!   beginning when every frame in it is in the database and no reader uses it; under steady
//!   load that moment never comes by itself. RESTART takes the write lock, copies the few
//!   frames the last passive pass left, syncs the database and waits for readers, so the
//!   writer's next transaction starts the log over. The writer waits meanwhile: the price
//!   is kept small by a passive pass and a sync of the database file just before (both
//!   without locks), and bounded by [`RESTART_PATIENCE`], after which the attempt gives up
//!   and is retried later, backing off while it keeps failing.
//! - **`journal_size_limit`** on the writer truncates a log that grew beyond [`SIZE_LIMIT`]
//!   (under a long-held reader, say) back to it when the log starts over.
//!
//! A reader that holds a snapshot for long (an open transaction, a backup of a large
//! database) keeps the log from starting over, so it grows with every commit: the thread
//! reports the log's size and what is not yet copied after every pass
//! (`eventserver_wal_bytes`, `eventserver_wal_pending_bytes`), and logs a warning while the
//! log has been over its bound for [`STUCK_AFTER`].
//!
//! The figures before and after are in the README (`cargo bench --bench load -- publish
//! --conns 64 --duration 60`: publish p99 and max while checkpoints happen);
//! `tests/it/checkpoint.rs` holds a reader open and watches the metrics and the log.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// The log's size beyond which a RESTART is attempted. At ~130 frames per commit of 64
/// events over 64 streams, about 30 commits, as SQLite's automatic checkpoint was set to.
const RESTART_BYTES: u64 = 16 << 20;

/// The writer's `journal_size_limit`: a log that starts over beyond it is truncated to it.
/// Twice the RESTART bound, as the log grows a little past it before a RESTART succeeds,
/// and truncating it every time would have it grow the file again right after.
pub const SIZE_LIMIT: u64 = 2 * RESTART_BYTES;

/// Longest the writer waits for one RESTART attempt (the write lock, the last copy, the
/// readers).
const RESTART_PATIENCE: Duration = Duration::from_millis(20);

/// Longest wait before retrying a RESTART that gave up, doubling from [`RETRY_FIRST`].
const RETRY_MAX: Duration = Duration::from_secs(5);
const RETRY_FIRST: Duration = Duration::from_millis(50);

/// Commits between two passes (the writer pokes after each; pokes that come while a pass
/// runs count once). On two cores the passes compete with the writer and the workers for
/// CPU: every 32 commits cost 6–10% of the publish bench's throughput at 64 connections
/// against the writer checkpointing itself (three interleaved pairs of `cargo bench --bench
/// load -- publish --conns 64`), every 256 commits nothing beyond noise; the RESTART past
/// [`RESTART_BYTES`] bounds the log either way. Counting commits rather than time keeps a
/// lightly loaded server's log to a few hundred commits, and leaves a log that a full disk
/// stopped as it is
/// (`abuse::a_full_disk_fails_writes_cleanly_and_they_resume_when_space_returns`).
const PASS_EVERY: u32 = 256;

/// After this long without commits, a pass retries a RESTART that gave up.
const IDLE_PASS: Duration = Duration::from_secs(1);

/// How long the log may stay over its bound before it is logged, and between warnings.
const STUCK_AFTER: Duration = Duration::from_secs(30);

/// The log as the last checkpoint left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wal {
    /// Bytes of frames in the log.
    pub bytes: u64,
    /// Bytes of those frames not yet copied into the database file.
    pub pending: u64,
}

thread_local! {
    /// When the checkpoint connection's busy handler gives up; SQLite calls it on the
    /// thread that runs the checkpoint.
    static GIVE_UP_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Waits in short steps until the deadline of the checkpoint running on this thread.
fn until_give_up(_tries: i32) -> bool {
    let waiting = GIVE_UP_AT.with(|at| at.get().is_some_and(|at| Instant::now() < at));
    if waiting {
        std::thread::sleep(Duration::from_micros(50));
    }
    waiting
}

/// Whether the log has been kept from starting over for long enough to say so.
#[derive(Debug, Default)]
struct Stuck {
    /// Since when RESTART attempts have been failing.
    since: Option<Instant>,
    warned_at: Option<Instant>,
}

impl Stuck {
    /// Takes a pass's outcome at `now`: whether the log is `over` its bound, and whether a
    /// RESTART was attempted and `restarted` it. Returns how long the log has been stuck
    /// when that is to be logged: after [`STUCK_AFTER`], and again every [`STUCK_AFTER`].
    fn after(&mut self, now: Instant, over: bool, restarted: Option<bool>) -> Option<Duration> {
        match (over, restarted) {
            (false, _) | (true, Some(true)) => self.since = None,
            (true, Some(false)) => {
                self.since.get_or_insert(now);
            }
            (true, None) => {}
        }
        let stuck_for = now.duration_since(self.since?);
        let quiet = self
            .warned_at
            .is_none_or(|at| now.duration_since(at) >= STUCK_AFTER);
        (stuck_for >= STUCK_AFTER && quiet).then(|| {
            self.warned_at = Some(now);
            stuck_for
        })
    }
}

/// A connection that checkpoints the database, and what it has seen.
pub struct Checkpointer {
    conn: Connection,
    db: PathBuf,
    /// Bytes per frame: a page and its 24-byte header.
    frame: u64,
}

impl Checkpointer {
    /// Opens the checkpoint connection on an existing database.
    pub fn open(db: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_handler(Some(until_give_up))?;
        let page: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(Checkpointer {
            conn,
            db: db.to_owned(),
            frame: page + 24,
        })
    }

    /// Checkpoints every [`PASS_EVERY`] pokes (and after [`IDLE_PASS`] without one while
    /// the log is over its bound) until `pokes` disconnects; hands `report` the log's state
    /// after each pass.
    pub fn run(self, pokes: &Receiver<()>, report: impl Fn(Wal)) {
        let mut retry_at = Instant::now();
        let mut retry_in = RETRY_FIRST;
        let mut stuck = Stuck::default();
        let mut unpassed = 0;
        let mut over = false;
        loop {
            let due = match pokes.recv_timeout(IDLE_PASS) {
                Ok(()) => {
                    unpassed += 1;
                    unpassed >= PASS_EVERY
                }
                Err(RecvTimeoutError::Timeout) => over,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if !due {
                continue;
            }
            unpassed = 0;
            let Some((_, mut wal)) = self.logged(self.pass("PASSIVE")) else {
                continue;
            };
            let now = Instant::now();
            let mut restarted = None;
            if wal.bytes >= RESTART_BYTES && now >= retry_at {
                let attempt = self.logged(self.restart());
                restarted = Some(attempt.is_some_and(|(done, _)| done));
                match attempt {
                    Some((true, after)) => {
                        wal = after;
                        retry_in = RETRY_FIRST;
                    }
                    _ => {
                        retry_at = now + retry_in;
                        retry_in = (retry_in * 2).min(RETRY_MAX);
                    }
                }
            }
            report(wal);
            over = wal.bytes >= RESTART_BYTES;
            if let Some(stuck_for) = stuck.after(now, over, restarted) {
                crate::log::warn(&format!(
                    "the write-ahead log holds {} MiB ({} MiB not yet in the database) and \
                     could not start over for {} s: a long-held read (an open transaction, a \
                     backup) keeps it",
                    wal.bytes >> 20,
                    wal.pending >> 20,
                    stuck_for.as_secs()
                ));
            }
        }
    }

    /// `Some` of a checkpoint's outcome; `None`, logged, if it failed.
    fn logged<T>(&self, outcome: Result<T, StoreError>) -> Option<T> {
        outcome
            .map_err(|e| crate::log::warn(&format!("checkpoint failed: {e}")))
            .ok()
    }

    /// One checkpoint in `mode`: whether it completed, and the log it left.
    fn pass(&self, mode: &str) -> Result<(bool, Wal), StoreError> {
        let (busy, log, done): (i64, i64, i64) =
            self.conn
                .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
        let frames = |n: i64| n.max(0) as u64 * self.frame;
        Ok((
            busy == 0,
            Wal {
                bytes: frames(log),
                pending: frames(log - done),
            },
        ))
    }

    /// A RESTART attempt, prepared so that it holds the write lock briefly: a passive pass
    /// copies all but the last commits' frames and the database file is synced, both
    /// without any lock, so the RESTART itself copies and syncs only what came since
    /// (fsync flushes a file's data whichever descriptor asks). Timed in a build of this
    /// function under `cargo bench --bench load -- publish --conns 64 --duration 20 --api
    /// streams` (167 RESTARTs, all completed): the passive pass took 2.2 ms at the median
    /// (4.8 ms at p90) and the sync 2.6 ms (4.9 ms), both while commits went on; the RESTART,
    /// its wait for the write lock included, 3.5 ms (6.4 ms, at most 13 ms). So most of
    /// what a commit used to wait for is off its path, but not all of it.
    fn restart(&self) -> Result<(bool, Wal), StoreError> {
        self.pass("PASSIVE")?;
        std::fs::File::open(&self.db)
            .and_then(|file| file.sync_data())
            .map_err(|e| StoreError::File(self.db.clone(), e))?;
        GIVE_UP_AT.with(|at| at.set(Some(Instant::now() + RESTART_PATIENCE)));
        let outcome = self.pass("RESTART");
        GIVE_UP_AT.with(|at| at.set(None));
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;

    /// The writer's connection lets its log grow however large, and a RESTART from the
    /// checkpoint connection has it start over at its next commit, cut to the size limit.
    #[test]
    fn the_writer_never_checkpoints_and_a_restart_lets_its_log_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let writer = super::super::open_write(&db, SyncMode::Normal).unwrap();
        writer
            .execute_batch("CREATE TABLE blobs (b BLOB NOT NULL)")
            .unwrap();
        let checkpointer = Checkpointer::open(&db).unwrap();
        // 40 MiB in 160 commits; an automatic checkpoint would have started the log over.
        for _ in 0..160 {
            writer
                .execute("INSERT INTO blobs (b) VALUES (zeroblob(262144))", [])
                .unwrap();
        }
        let wal = db.with_extension("db-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 40 << 20);
        let (done, before) = checkpointer.restart().unwrap();
        assert!(done, "no reader holds the log");
        assert!(before.bytes > 40 << 20 && before.pending == 0, "{before:?}");
        writer
            .execute("INSERT INTO blobs (b) VALUES (x'00')", [])
            .unwrap();
        let (_, after) = checkpointer.pass("PASSIVE").unwrap();
        assert!(after.bytes < 1 << 20, "{after:?}");
        assert!(std::fs::metadata(&wal).unwrap().len() <= SIZE_LIMIT);
    }

    /// A log kept from starting over is reported after [`STUCK_AFTER`] and every
    /// [`STUCK_AFTER`] after that, and no more once it starts over.
    #[test]
    fn a_log_that_cannot_start_over_is_reported_every_stuck_after() {
        let mut stuck = Stuck::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(stuck.after(at(0), true, Some(false)), None);
        assert_eq!(stuck.after(at(10), true, None), None);
        assert_eq!(stuck.after(at(29), true, Some(false)), None);
        assert_eq!(stuck.after(at(30), true, None), Some(STUCK_AFTER));
        assert_eq!(stuck.after(at(45), true, Some(false)), None);
        assert_eq!(stuck.after(at(60), true, Some(false)), Some(at(60) - at(0)));
        assert_eq!(stuck.after(at(61), true, Some(true)), None);
        assert_eq!(stuck.after(at(200), true, None), None, "it started over");
        assert_eq!(stuck.after(at(201), false, None), None);
    }
}
