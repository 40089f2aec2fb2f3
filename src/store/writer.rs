//! The single writer thread: group commit of appends and ACKs.
//!
//! The writer blocks for the first job, takes whatever else is queued (up to
//! [`MAX_BATCH`]), applies it all in one transaction, commits, and only then hands the
//! results to the commit hook, which wakes long-poll waiters and answers the requests.
//! Workers never wait for a commit, so batches grow with the load instead of being capped
//! by the worker count. Retention runs in transactions of its own, one bounded chunk after
//! each batch of other jobs ([`super::retention`]).
//!
//! # A failed commit
//!
//! A failed transaction fails every job in it, and nothing of it is visible: SQLite writes
//! a commit's frames to the WAL, syncs the WAL, and only then publishes the commit in the
//! wal-index that every reader (and the next writer) goes by; a failed sync returns before
//! that (`walFrames` in the bundled `sqlite3.c`). But it may be stored: frames that reached
//! the disk before the failure carry a valid commit frame, and the recovery that runs when
//! the database is next opened takes every frame up to the last valid commit frame, valid
//! meaning its salt and the checksum chained through all frames before it match (the WAL
//! format in sqlite.org/fileformat2.html; `walIndexRecover` in `sqlite3.c`). The next
//! successful commit writes its frames at the same place in the WAL, which breaks that
//! chain (or starts the WAL over with a new salt), so after it the failed commit can no
//! longer come back. Hence a 500 means "not visible, maybe stored"; the README tells
//! producers how to find out.
//!
//! After a disk failure (a read, write or sync error, or a full disk) the writer goes on
//! with a new connection and closes the old one (`Sqlite::reopen`). SQLite documents only that
//! after `SQLITE_IOERR` or `SQLITE_FULL` a transaction "might be rolled back automatically"
//! (sqlite.org/c3ref/get_autocommit.html), not what the failed connection's page cache,
//! WAL snapshot and VFS file state may still hold, so none of it is kept: the new connection
//! starts from the wal-index, which holds exactly the commits that were synced.
//! `abuse::a_full_disk_fails_writes_cleanly_and_they_resume_when_space_returns` fills the
//! disk, waits for the reopening, and checks that writes resume and nothing else is stored.
//! (The kernel's page cache is shared by every connection, and no reopening refreshes it:
//! after a failed fsync Linux may keep pages that never reached the disk. Those are the
//! failed commit's own frames, beyond the last commit the wal-index knows, so no one reads
//! them, and the next commit writes over them.)

use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use super::retention::Sweep;
use super::{Retention, StoreError};
use crate::clock::Clock;
use crate::event::Event;

/// Most jobs committed in one transaction; large enough to amortise the fsync.
pub const MAX_BATCH: usize = 1024;

/// What an append stores.
#[derive(Debug)]
pub enum Payload {
    /// A streams-API event: the validated fields (`,"event":…` and so on) that follow the
    /// element's metadata, and the event name.
    Element {
        /// The event name consumers filter by.
        name: String,
        /// JSON object members, each preceded by a comma.
        fields: String,
    },
    /// A `/publish` event: its `data`, stored as posted.
    Data(String),
}

/// Why a write was refused or failed.
#[derive(Debug, Clone)]
pub enum WriteError {
    /// The stream belongs to another producer.
    Locked,
    /// The stream or event does not exist.
    NotFound,
    /// The writer's queue is full (or it has stopped); nothing was tried.
    Busy,
    /// The database failed; the transaction was rolled back. Shared by every job of it.
    Storage(Arc<StoreError>),
}

/// Who receives a job's outcome: the handler that queued it (which answers its request),
/// or an in-process caller. Called once, on a worker, after the job's transaction committed
/// or failed.
pub struct Done<T>(Box<dyn FnOnce(Result<T, WriteError>) + Send>);

impl<T> Done<T> {
    /// Hands the outcome to `receive`.
    pub fn new(receive: impl FnOnce(Result<T, WriteError>) + Send + 'static) -> Done<T> {
        Done(Box::new(receive))
    }

    /// Hands over the outcome.
    pub fn send(self, result: Result<T, WriteError>) {
        (self.0)(result)
    }
}

/// A job's outcome with its receiver, handed from the writer to a worker to deliver.
pub enum Answer {
    /// An append's outcome: the committed event.
    Event(Done<Arc<Event>>, Result<Arc<Event>, WriteError>),
    /// An ACK's or a heartbeat's outcome.
    Unit(Done<()>, Result<(), WriteError>),
}

impl Answer {
    /// Delivers the outcome to its receiver.
    pub fn send(self) {
        match self {
            Answer::Event(done, result) => done.send(result),
            Answer::Unit(done, result) => done.send(result),
        }
    }
}

/// A unit of work for the writer.
pub enum Job {
    /// Append one event to `stream`, claiming it for `producer` if unowned.
    Append {
        /// Stream name.
        stream: String,
        /// The producer writing, if any; `None` neither claims nor may write owned streams.
        producer: Option<String>,
        /// What to store.
        payload: Payload,
        /// Receives the committed event.
        done: Done<Arc<Event>>,
    },
    /// Move `consumer`'s offset for the acknowledged event's name up to that event.
    Ack {
        /// Stream name.
        stream: String,
        /// Consumer id.
        consumer: String,
        /// The acknowledged event.
        id: Uuid,
        /// Receives the outcome.
        done: Done<()>,
    },
    /// Write a heartbeat row: answers `Ok` only if the database takes writes.
    Heartbeat(Done<()>),
    /// Delete events beyond the retention limits, in every stream, in chunks between
    /// other jobs; replaces a run still under way.
    Retain(Retention),
    /// Commit everything queued before it, then stop the writer.
    Stop,
}

/// Events committed to one stream by one transaction, oldest first.
#[derive(Debug)]
pub struct Appended {
    /// Stream name.
    pub stream: String,
    /// The new events.
    pub events: Vec<Arc<Event>>,
}

/// What a committed (or failed) transaction produced.
pub struct Committed {
    /// Jobs in the transaction.
    pub jobs: usize,
    /// Time to apply and commit it.
    pub took: std::time::Duration,
    /// New events per stream; empty when the transaction failed.
    pub appended: Vec<Appended>,
    /// Outcomes to deliver, one per job that has a receiver, in job order.
    pub replies: Vec<Answer>,
}

/// What the writer commits to: one database connection and the retention run under way.
/// The loop in [`run`] (batching, stop, retention between batches) is the same for every
/// engine; only these steps differ.
pub trait Log {
    /// Applies `batch` in one transaction stamped `ts`, and commits it: each job's
    /// outcome, in order. On failure nothing of the batch is stored or visible.
    fn apply(&mut self, batch: &[Job], ts: u64) -> Result<Vec<Outcome>, StoreError>;
    /// Recovers after `apply` failed with `e` on `what`, which is logged.
    fn failed(&mut self, what: &str, e: &StoreError);
    /// Starts a retention run, unless one is under way: restarting it each minute, a run
    /// over a large held backlog would never finish nor count what it holds.
    fn retain(&mut self, limits: Retention);
    /// Whether a retention run is under way.
    fn retaining(&self) -> bool;
    /// Commits the next chunk of the retention run under way, alone in its transaction:
    /// if deleting fails, no append or ACK fails with it. A failure is logged and ends
    /// the run.
    fn retain_chunk(&mut self, ts: u64);
    /// How far the database's clock is ahead of this host's (ms), when it is time to
    /// measure it again: a node sharing its database follows that clock (see `clock`).
    fn clock_offset(&mut self) -> Option<i64> {
        None
    }
}

/// Runs the writer until it takes [`Job::Stop`] (or every sender is gone), then returns
/// the log.
pub fn run<L: Log>(
    mut log: L,
    jobs: Receiver<Job>,
    clock: Arc<Clock>,
    on_commit: impl Fn(Committed),
) -> L {
    let mut next = None;
    loop {
        if let Some(offset) = log.clock_offset() {
            clock.follow(offset);
        }
        let first = match (next.take(), log.retaining()) {
            (Some(job), _) => Some(job),
            (None, true) => jobs.try_recv().ok(),
            (None, false) => match jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            },
        };
        match first {
            Some(Job::Retain(limits)) => log.retain(limits),
            Some(first) => {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match jobs.try_recv() {
                        Ok(job @ Job::Retain(_)) => {
                            next = Some(job);
                            break;
                        }
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let stop = batch.iter().any(|job| matches!(job, Job::Stop));
                let ts = clock.stamp_batch();
                let started = std::time::Instant::now();
                let jobs = batch.len();
                let mut committed = match log.apply(&batch, ts) {
                    Ok(outcomes) => finish(batch, outcomes),
                    Err(e) => {
                        log.failed(&format!("commit of {jobs} jobs"), &e);
                        fail(batch, WriteError::Storage(Arc::new(e)))
                    }
                };
                committed.jobs = jobs;
                committed.took = started.elapsed();
                on_commit(committed);
                clock.batch_done();
                if stop {
                    break;
                }
            }
            None => {}
        }
        if log.retaining() {
            let ts = clock.stamp_batch();
            let started = std::time::Instant::now();
            log.retain_chunk(ts);
            on_commit(Committed {
                jobs: 1,
                took: started.elapsed(),
                appended: Vec::new(),
                replies: Vec::new(),
            });
            clock.batch_done();
        }
    }
    log
}

/// The SQLite log: the write connection, the stream rows it has touched, and the
/// retention run under way.
pub struct Sqlite {
    conn: Connection,
    streams: StreamCache,
    /// A retention run under way: a chunk of it commits after each batch of other jobs.
    sweep: Option<Sweep>,
}

impl Sqlite {
    /// The log on the write connection `conn`.
    pub fn new(conn: Connection) -> Sqlite {
        Sqlite {
            conn,
            streams: StreamCache::default(),
            sweep: None,
        }
    }

    /// The write connection, for the last checkpoint once the writer stopped.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

impl Log for Sqlite {
    fn apply(&mut self, batch: &[Job], ts: u64) -> Result<Vec<Outcome>, StoreError> {
        apply(&mut self.conn, &mut self.streams, batch, ts)
    }

    fn failed(&mut self, what: &str, e: &StoreError) {
        // The cache may hold what the rolled-back transaction did: start afresh.
        self.streams = StreamCache::default();
        crate::log::error(&format!("{what} failed: {e}"));
        if e.is_disk_failure() {
            self.reopen();
            // A reopened connection lost the retention run's cutoffs.
            self.sweep = self.sweep.map(Sweep::anew);
        }
    }

    fn retain(&mut self, limits: Retention) {
        if self.sweep.is_none() {
            self.sweep = Some(Sweep::new(limits));
        }
    }

    fn retaining(&self) -> bool {
        self.sweep.is_some()
    }

    fn retain_chunk(&mut self, ts: u64) {
        let Some(run) = self.sweep.take() else { return };
        let chunk = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)
            .and_then(|tx| {
                let more = run.chunk(&tx, ts)?;
                tx.commit()?;
                Ok(more)
            });
        match chunk {
            Ok(more) => self.sweep = more,
            Err(e) => {
                crate::log::error(&format!("retention failed: {e}"));
                if e.is_disk_failure() {
                    self.reopen();
                }
            }
        }
    }
}

impl Sqlite {
    /// A new write connection in place of the current one after a disk failure (see the
    /// module docs); the current one stays if the database cannot be opened again, to be
    /// retried after the next failure.
    fn reopen(&mut self) {
        match super::reopen_write(&self.conn) {
            Ok(fresh) => {
                self.conn = fresh;
                crate::log::warn("reopened the write connection after a disk failure");
            }
            Err(e) => crate::log::error(&format!(
                "could not reopen the write connection after a disk failure: {e}"
            )),
        }
    }
}

/// The result of one job inside a transaction that has not committed yet.
pub enum Outcome {
    /// An append stored this event; the index is its stream's in the batch's `Appended`.
    Appended(usize, Arc<Event>),
    /// The job did its work and returns nothing: an ACK moved an offset, a heartbeat was
    /// written, or the stop barrier was reached.
    Finished,
    /// The job was refused; the rest of the transaction goes on.
    Refused(WriteError),
}

struct StreamRow {
    id: i64,
    owner: Option<String>,
    last_seq: u64,
    /// Index into the batch's `Appended` list, once this stream got an event.
    appended: Option<usize>,
}

/// The writer's copy of the stream rows it has touched, kept across batches so an append
/// costs no lookup. Only the writer appends; admin commands (`stream release`) commit from
/// other connections, which changes `PRAGMA data_version` and empties the cache.
#[derive(Default)]
struct StreamCache {
    rows: HashMap<String, StreamRow>,
    data_version: Option<i64>,
}

/// Most stream rows cached; beyond it the cache starts afresh.
const STREAM_CACHE: usize = 65_536;

fn apply(
    conn: &mut Connection,
    cache: &mut StreamCache,
    batch: &[Job],
    ts: u64,
) -> Result<Vec<Outcome>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA data_version", [], |r| r.get(0))?;
    if cache.data_version != Some(version) || cache.rows.len() > STREAM_CACHE {
        cache.rows.clear();
        cache.data_version = Some(version);
    }
    let streams = &mut cache.rows;
    // The streams this batch appended to, in the order of their first event.
    let mut touched: Vec<&str> = Vec::new();
    let mut claimed: Vec<(i64, &str)> = Vec::new(); // (id, producer) of unowned streams
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut insert_event = tx.prepare_cached(
            "INSERT INTO events (stream_id, seq, id, name, ts, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for job in batch {
            let outcome = match job {
                Job::Append {
                    stream,
                    producer,
                    payload,
                    ..
                } => {
                    let row = match streams.get_mut(stream.as_str()) {
                        Some(row) => row,
                        None => {
                            let row = load_or_create(&tx, stream, producer.as_deref(), ts)?;
                            streams.entry(stream.clone()).or_insert(row)
                        }
                    };
                    match (&row.owner, producer) {
                        (Some(owner), Some(p)) if owner == p => {}
                        (Some(_), _) => {
                            outcomes.push(Outcome::Refused(WriteError::Locked));
                            continue;
                        }
                        (None, Some(p)) => {
                            row.owner = Some(p.clone());
                            claimed.push((row.id, p));
                        }
                        (None, None) => {}
                    }
                    row.last_seq += 1;
                    let event = super::schema::render(payload, row.last_seq, ts);
                    // A named event's element is put together again when read (`schema`).
                    let stored = match payload {
                        Payload::Element { fields, .. } => fields,
                        Payload::Data(data) => data,
                    };
                    insert_event.execute(params![
                        row.id,
                        event.seq as i64,
                        &event.id.as_bytes()[..],
                        event.name.as_deref(),
                        ts as i64,
                        stored,
                    ])?;
                    let slot = *row.appended.get_or_insert_with(|| {
                        touched.push(stream);
                        touched.len() - 1
                    });
                    Outcome::Appended(slot, Arc::new(event))
                }
                Job::Ack {
                    stream,
                    consumer,
                    id,
                    ..
                } => ack(&tx, stream, consumer, id)?,
                Job::Heartbeat(_) => {
                    tx.prepare_cached(
                        "INSERT INTO heartbeat (id, at_ms) VALUES (1, ?1) \
                         ON CONFLICT (id) DO UPDATE SET at_ms = excluded.at_ms",
                    )?
                    .execute([ts as i64])?;
                    Outcome::Finished
                }
                // A batch never holds Retain: `run` starts a sweep with it.
                Job::Retain(_) | Job::Stop => Outcome::Finished,
            };
            outcomes.push(outcome);
        }
        // Only a claim changes a stream's row (see `schema`).
        for (id, owner) in &claimed {
            tx.prepare_cached("UPDATE streams SET owner = ?2 WHERE id = ?1")?
                .execute(params![id, owner])?;
        }
        for name in &touched {
            streams
                .get_mut(*name)
                .expect("touched streams are cached")
                .appended = None;
        }
    }
    tx.commit()?;
    Ok(outcomes)
}

fn load_or_create(
    tx: &rusqlite::Transaction<'_>,
    stream: &str,
    producer: Option<&str>,
    ts: u64,
) -> Result<StreamRow, StoreError> {
    if let Some(info) = super::reader::stream_info(tx, stream)? {
        return Ok(StreamRow {
            id: info.id,
            owner: info.owner,
            last_seq: info.last_seq,
            appended: None,
        });
    }
    // A new stream belongs to the producer that wrote it first; the claim is atomic because
    // only this thread writes and it does so inside the transaction.
    tx.prepare_cached("INSERT INTO streams (name, owner, created_ms) VALUES (?1, ?2, ?3)")?
        .execute(params![stream, producer, ts as i64])?;
    Ok(StreamRow {
        id: tx.last_insert_rowid(),
        owner: producer.map(str::to_owned),
        last_seq: 0,
        appended: None,
    })
}

fn ack(
    tx: &rusqlite::Transaction<'_>,
    stream: &str,
    consumer: &str,
    id: &Uuid,
) -> Result<Outcome, StoreError> {
    let found: Option<(i64, i64, Option<String>)> = tx
        .prepare_cached(
            "SELECT s.id, e.seq, e.name FROM events e JOIN streams s ON s.id = e.stream_id \
             WHERE e.id = ?1 AND s.name = ?2",
        )?
        .query_row(params![&id.as_bytes()[..], stream], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    // Events published through /publish have no name, hence no offset an ACK could move.
    let Some((stream_id, seq, Some(name))) = found else {
        return Ok(Outcome::Refused(WriteError::NotFound));
    };
    tx.prepare_cached(
        "INSERT INTO offsets (stream_id, consumer, name, seq) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (stream_id, consumer, name) DO UPDATE SET seq = max(seq, excluded.seq)",
    )?
    .execute(params![stream_id, consumer, name, seq])?;
    Ok(Outcome::Finished)
}

fn finish(batch: Vec<Job>, outcomes: Vec<Outcome>) -> Committed {
    let mut appended: Vec<Appended> = Vec::new();
    let mut replies: Vec<Answer> = Vec::with_capacity(batch.len());
    for (job, outcome) in batch.into_iter().zip(outcomes) {
        match (job, outcome) {
            (Job::Append { stream, done, .. }, Outcome::Appended(slot, event)) => {
                if slot == appended.len() {
                    appended.push(Appended {
                        stream,
                        events: Vec::new(),
                    });
                }
                appended[slot].events.push(event.clone());
                replies.push(Answer::Event(done, Ok(event)));
            }
            (job, Outcome::Refused(e)) => replies.extend(job.refused(e)),
            (Job::Ack { done, .. } | Job::Heartbeat(done), _) => {
                replies.push(Answer::Unit(done, Ok(())))
            }
            (Job::Stop | Job::Retain(_), _) => {}
            // Appends end as `Appended` or `Refused`; answer rather than drop if that changes.
            (Job::Append { done, .. }, Outcome::Finished) => {
                let broken = StoreError::Invariant("an append ended without an event");
                replies.push(Answer::Event(
                    done,
                    Err(WriteError::Storage(Arc::new(broken))),
                ))
            }
        }
    }
    Committed {
        jobs: 0,
        took: std::time::Duration::ZERO,
        appended,
        replies,
    }
}

fn fail(batch: Vec<Job>, error: WriteError) -> Committed {
    Committed {
        jobs: 0,
        took: std::time::Duration::ZERO,
        appended: Vec::new(),
        replies: batch
            .into_iter()
            .filter_map(|job| job.refused(error.clone()))
            .collect(),
    }
}

impl Job {
    /// The answer refusing this job with `error`; `None` for jobs nobody waits on.
    pub fn refused(self, error: WriteError) -> Option<Answer> {
        match self {
            Job::Append { done, .. } => Some(Answer::Event(done, Err(error))),
            Job::Ack { done, .. } | Job::Heartbeat(done) => Some(Answer::Unit(done, Err(error))),
            Job::Stop | Job::Retain(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(stream: &str) -> Job {
        Job::Append {
            stream: stream.into(),
            producer: None,
            payload: Payload::Data("1".into()),
            done: Done::new(|_| {}),
        }
    }

    /// Appends queued around a retention job commit without it: the retention's
    /// transaction holds nothing else.
    #[test]
    fn retention_commits_in_a_transaction_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            super::super::open_write(&dir.path().join("t.db"), crate::config::SyncMode::Full)
                .unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        for job in [
            append("a"),
            append("b"),
            Job::Retain(Retention {
                max_events: Some(1),
                max_age_ms: None,
                acked_only: false,
            }),
            append("a"),
            Job::Stop,
        ] {
            tx.send(job).unwrap();
        }
        let batches = std::sync::Mutex::new(Vec::new());
        run(
            Sqlite::new(conn),
            rx,
            Arc::new(Clock::starting_at(0)),
            |c| batches.lock().unwrap().push(c.jobs),
        );
        assert_eq!(batches.into_inner().unwrap(), [2, 1, 2]);
    }
}
