//! The durable log: the only module that names rusqlite.
//!
//! One SQLite file in WAL mode. Exactly one writer thread ([`writer`]) owns the write
//! connection and commits queued appends and ACKs together (group commit); every worker reads
//! through its own [`Reader`] and never waits for the writer. Schema changes are an
//! append-only list of migrations keyed by `PRAGMA user_version`.
//!
//! # What this relies on about SQLite (bundled, WAL mode)
//!
//! Only what SQLite documents, through rusqlite's safe API: the default VFS, no `unsafe`
//! here (`forbid` below holds it).
//!
//! - **A commit is on disk when it returns, with `synchronous=FULL`**: "With
//!   synchronous=FULL in WAL mode, an additional sync operation of the WAL file happens
//!   after each transaction commit" (sqlite.org/pragma.html#pragma_synchronous). The writer
//!   answers producers only after their commit returned, so a 200 means the event is on
//!   disk; `tests/it/crash.rs` kills the server under load and finds every answered event
//!   again, once and in order. Each WAL frame costs SQLite two writes (its header, then the
//!   page) before that sync: the price of staying on the default VFS ([`schema`] says
//!   what a commit writes).
//! - **An fsync per commit, not per event.** With `synchronous=FULL` every commit waits for
//!   the disk, so one event per transaction is bounded by the disk's sync rate; batching
//!   whatever is queued into one transaction scales with the producers instead.
//!   `cargo bench --bench load -- publish` shows it: 64 connections carry several times the
//!   single connection's appends, and the server's mean batch per commit is printed beside.
//! - **Workers must not wait for the commit**: with blocking workers a batch can never hold
//!   more jobs than there are workers. A job carries its reply to the writer instead
//!   ([`writer::Done`]), so the worker is free at once.
//! - **Reads by event name need the `(stream_id, name, seq)` index**: without it a
//!   consumer's read filtered by a rare name walks the whole stream. The consume bench
//!   (`-- consume`) pages through 100,000 events by name.
//! - **WAL readers never block the writer, nor it them**: each worker has its own read
//!   connection; `tests/it/crash.rs` kills the server mid-load and checks that every
//!   acknowledged event is there, once and in order.
//! - **A checkpoint on another connection holds commits up only when it must**: a PASSIVE
//!   one takes no lock the writer waits for; only the RESTART that lets the log start over
//!   takes the write lock, briefly ([`mod@checkpoint`]). The writer's busy handler waits in
//!   short steps, so it resumes as soon as that lock is let go.

#![forbid(unsafe_code)]

pub mod admin;
mod checkpoint;
#[cfg(feature = "postgres")]
pub mod pg;
mod reader;
mod retention;
mod schema;
pub mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::config::SyncMode;

pub use checkpoint::Checkpointer;
pub use reader::Reader;
pub use retention::Retention;

/// A failure of the database; its message is for logs and operators, never for clients.
#[derive(Debug)]
pub enum StoreError {
    /// SQLite refused or failed an operation.
    Sqlite(rusqlite::Error),
    /// An operator command named a database file that does not exist.
    Missing(PathBuf),
    /// The file is a database, but not one of eventserver's.
    Foreign(PathBuf),
    /// The schema is older than this eventserver's; only the server upgrades it, at start.
    TooOld {
        /// The database's schema version.
        version: usize,
    },
    /// The schema is newer than this eventserver knows.
    TooNew {
        /// The database's schema version.
        version: usize,
    },
    /// SQLite kept the database out of WAL mode.
    NotWal(PathBuf),
    /// A path SQLite must be given as text is not valid UTF-8.
    NotUtf8(PathBuf),
    /// A file beside the database (a backup) could not be written, synced or moved.
    File(PathBuf, std::io::Error),
    /// Something this code relies on did not hold; the message says what.
    Invariant(&'static str),
    /// PostgreSQL refused or failed an operation, or could not be reached.
    #[cfg(feature = "postgres")]
    Pg(pg::PgError),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = schema::MIGRATIONS.len();
        match self {
            StoreError::Sqlite(e) => write!(f, "{e}"),
            StoreError::Missing(path) => write!(
                f,
                "no database at {} (check --db / EVENTSERVER_DB)",
                path.display()
            ),
            StoreError::Foreign(path) => {
                write!(f, "{} is not an eventserver database", path.display())
            }
            StoreError::TooOld { version } => write!(
                f,
                "the database has schema version {version}, older than this eventserver's \
                 ({known}): start the server once to upgrade it"
            ),
            StoreError::TooNew { version } => write!(
                f,
                "the database has schema version {version}, newer than this eventserver \
                 knows ({known})"
            ),
            StoreError::NotWal(path) => {
                write!(f, "could not switch {} to WAL mode", path.display())
            }
            StoreError::NotUtf8(path) => write!(f, "{} is not valid UTF-8", path.display()),
            StoreError::File(path, e) => write!(f, "{}: {e}", path.display()),
            StoreError::Invariant(what) => f.write_str(what),
            #[cfg(feature = "postgres")]
            StoreError::Pg(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Sqlite(e) => Some(e),
            StoreError::File(_, e) => Some(e),
            #[cfg(feature = "postgres")]
            StoreError::Pg(e) => Some(e),
            _ => None,
        }
    }
}

impl StoreError {
    /// Whether the disk failed: a read, write or sync error, or no space left. Unlike a
    /// refusal or a lock held elsewhere, such a failure leaves in doubt what the failed
    /// transaction left in the files and in the connection's caches.
    pub fn is_disk_failure(&self) -> bool {
        let StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) = self else {
            return false;
        };
        matches!(
            e.code,
            rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::DiskFull
        )
    }
}

impl StoreError {
    /// Whether the database could not be reached or went away (PostgreSQL), a condition
    /// that passes by itself: clients get 503 and may retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            StoreError::Pg(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

#[cfg(feature = "postgres")]
impl From<pg::PgError> for StoreError {
    fn from(e: pg::PgError) -> StoreError {
        StoreError::Pg(e)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Sqlite(e)
    }
}

/// How long a connection waits for another one's lock (admin commands, checkpoints).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A busy handler that waits in steps of 100 µs, up to about [`BUSY_TIMEOUT`].
fn in_short_steps(tries: i32) -> bool {
    const STEP: Duration = Duration::from_micros(100);
    let waiting = STEP * u32::try_from(tries).unwrap_or(u32::MAX) < BUSY_TIMEOUT;
    if waiting {
        std::thread::sleep(STEP);
    }
    waiting
}

/// Opens (creating if needed) the database for writing and brings its schema up to date.
pub fn open_write(path: &Path, sync: SyncMode) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    // The checkpoint thread holds the write lock for a moment now and then; waiting in
    // short steps (not SQLite's default 1, 2, 5, 10 ms…) resumes the writer when it lets go.
    conn.busy_handler(Some(in_short_steps))?;
    let mode = switch_to_wal(&conn)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotWal(path.to_owned()));
    }
    let sync = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    // The writer never checkpoints: the checkpoint thread does (see `checkpoint`), and
    // shrinks a log that grew large when it starts over.
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA foreign_keys=OFF; PRAGMA wal_autocheckpoint=0; \
         PRAGMA journal_size_limit={};",
        checkpoint::SIZE_LIMIT
    ))?;
    schema::migrate(&mut conn)?;
    Ok(conn)
}

/// A new write connection on `conn`'s database with its `synchronous` setting, for the
/// writer to go on with after a disk failure.
pub fn reopen_write(conn: &Connection) -> Result<Connection, StoreError> {
    let path = conn
        .path()
        .filter(|path| !path.is_empty())
        .ok_or(StoreError::Invariant("the write connection is on a file"))?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    // 2 is FULL, 3 EXTRA; open_write sets only FULL or NORMAL (1).
    let sync = match sync >= 2 {
        true => SyncMode::Full,
        false => SyncMode::Normal,
    };
    open_write(Path::new(path), sync)
}

/// Puts the database in WAL mode and returns the mode it is in. SQLite answers "locked" at
/// once, without waiting, while another connection is switching a new database's mode
/// (two processes starting on it together): that is retried for the busy timeout.
fn switch_to_wal(conn: &Connection) -> Result<String, StoreError> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return Ok(result?),
        }
    }
}

/// Opens an existing database for an operator command. It never creates one, so a
/// mistyped `--db` is an error rather than a new empty database (from which `backup` would
/// have "succeeded"), and never migrates: upgrading the schema is the server's job at start,
/// and a newer binary's command must not change it under an older running server.
pub fn open_existing(path: &Path) -> Result<Connection, StoreError> {
    if !path.is_file() {
        return Err(StoreError::Missing(path.to_owned()));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = schema::MIGRATIONS.len();
    match version {
        0 => Err(StoreError::Foreign(path.to_owned())),
        version if version < known => Err(StoreError::TooOld { version }),
        version if version > known => Err(StoreError::TooNew { version }),
        _ => Ok(conn),
    }
}

/// Opens a read connection on an existing database.
pub fn open_read(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch("PRAGMA query_only=1;")?;
    Ok(conn)
}

/// The newest event timestamp on disk, so the clock never stamps below it after a restart.
pub fn newest_timestamp(conn: &Connection) -> Result<u64, StoreError> {
    let ms: i64 = conn.query_row(
        "SELECT coalesce(max(last_ms), 0) FROM stream_heads",
        [],
        |r| r.get(0),
    )?;
    Ok(ms.max(0) as u64)
}

/// The newest stored sequence number of a stream: one step down its `(stream_id, seq)` index.
const NEWEST_SEQ: &str = "SELECT seq FROM events WHERE stream_id = ?1 ORDER BY seq DESC LIMIT 1";
/// The first stored event of a stream at or after a sequence number, by the same index.
const FIRST_AT_OR_AFTER: &str =
    "SELECT seq, ts FROM events WHERE stream_id = ?1 AND seq >= ?2 ORDER BY seq LIMIT 1";

/// The newest sequence number of `stream_id` whose event is older than `ms` (`strict`) or
/// not newer than `ms`; 0 if there is none. Every stored event after it is at or after
/// `ms`, so it is a cursor for "events since `ms`".
///
/// A binary search over `seq`, relying on timestamps never decreasing along a stream. A
/// sequence number may be missing (retention, or an operator's `DELETE`), so each probe
/// reads the first stored event at or after the middle through the `(stream_id, seq)`
/// index: O(log n) index lookups, never a scan of the stream.
pub fn seq_at_time(
    conn: &Connection,
    stream_id: i64,
    ms: i64,
    strict: bool,
) -> Result<u64, StoreError> {
    let last: Option<i64> = conn
        .prepare_cached(NEWEST_SEQ)?
        .query_row([stream_id], |r| r.get(0))
        .optional()?;
    let Some(last) = last else {
        return Ok(0);
    };
    let mut at_or_after = conn.prepare_cached(FIRST_AT_OR_AFTER)?;
    bisect_time(last, ms, strict, |mid| {
        let probe = at_or_after.query_row(params![stream_id, mid], |r| Ok((r.get(0)?, r.get(1)?)));
        Ok(probe.optional()?)
    })
}

/// The search behind [`seq_at_time`], for any store: `first_at_or_after(seq)` gives the
/// first stored `(seq, ts)` of the stream at or after `seq`, and `last` bounds the
/// stream's sequence numbers.
pub(crate) fn bisect_time<E>(
    last: i64,
    ms: i64,
    strict: bool,
    mut first_at_or_after: impl FnMut(i64) -> Result<Option<(i64, i64)>, E>,
) -> Result<u64, E> {
    let before = |ts: i64| if strict { ts < ms } else { ts <= ms };
    // Invariant: every stored seq < lo is before `ms`, every stored seq > hi is not.
    let (mut lo, mut hi) = (0, last);
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match first_at_or_after(mid)? {
            // Nothing stored in mid..=hi.
            None => hi = mid - 1,
            Some((seq, _)) if seq > hi => hi = mid - 1,
            Some((seq, ts)) if before(ts) => lo = seq + 1,
            Some((seq, _)) => hi = seq - 1,
        }
    }
    Ok(hi.max(0) as u64)
}

/// Truncates the write-ahead log into the database file, for a clean shutdown.
pub fn checkpoint(conn: &Connection) -> Result<(), StoreError> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    /// Processes (here: threads) opening a new database at the same moment each migrate it
    /// or find it migrated; none fails on another's half of the work.
    #[test]
    fn concurrent_first_opens_migrate_once() {
        for round in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let path = Arc::new(dir.path().join("events.db"));
            let start = Arc::new(Barrier::new(8));
            let opened: Vec<_> = (0..8)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        open_write(&path, SyncMode::Full).map(|_| ())
                    })
                })
                .collect();
            for handle in opened {
                if let Err(e) = handle.join().unwrap() {
                    panic!("round {round}: {e}");
                }
            }
            let conn = open_existing(&path).unwrap();
            let version: usize = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(version, schema::MIGRATIONS.len());
        }
    }

    /// Whatever sequence numbers are missing, the cursor `seq_at_time` returns splits the
    /// stored events exactly at `ms`, as a scan of the whole stream would.
    #[test]
    fn seq_at_time_splits_a_stream_with_gaps_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_write(&dir.path().join("t.db"), SyncMode::Normal).unwrap();
        // Timestamps repeat (three events per millisecond) and never decrease; every
        // seventh event and a run in the middle are missing.
        let stored: Vec<(i64, i64)> = (1..=300)
            .filter(|seq| seq % 7 != 0 && !(140..160).contains(seq))
            .map(|seq| (seq, 1000 + seq / 3))
            .collect();
        for (seq, ts) in &stored {
            conn.execute(
                "INSERT INTO events (stream_id, seq, id, ts, data) VALUES (1, ?1, ?1, ?2, '')",
                [seq, ts],
            )
            .unwrap();
        }
        for ms in 990..1110 {
            for strict in [false, true] {
                let cursor = seq_at_time(&conn, 1, ms, strict).unwrap() as i64;
                let before = |ts: i64| if strict { ts < ms } else { ts <= ms };
                for (seq, ts) in &stored {
                    assert_eq!(*seq <= cursor, before(*ts), "ms {ms} strict {strict}");
                }
            }
        }
        assert_eq!(
            seq_at_time(&conn, 2, 1050, false).unwrap(),
            0,
            "no such stream"
        );
    }

    /// Each step of `seq_at_time` is an index search, never a scan: a scan costs time in
    /// proportion to the stream, on every `since_time` read that misses the recent tail.
    #[test]
    fn seq_at_time_searches_the_index_and_never_scans() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_write(&dir.path().join("t.db"), SyncMode::Normal).unwrap();
        for sql in [NEWEST_SEQ, FIRST_AT_OR_AFTER] {
            let literal = sql.replace("?1", "1").replace("?2", "1");
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {literal}"))
                .unwrap()
                .query_map([], |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(plan.len(), 1, "{sql}: {plan:?}");
            assert!(
                plan[0].starts_with("SEARCH events USING") && plan[0].contains("events_by_seq"),
                "{sql}: {plan:?}"
            );
        }
    }
}
