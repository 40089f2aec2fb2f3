//! A node's two kinds of connection to the shared database, as the server uses them: the
//! writer's [`Log`] (the same loop as SQLite's, applying each batch with
//! [`Database::write`]) and a worker's reads (a [`Connection`] in `store::Reader`). Both reconnect by themselves.
//!
//! # When PostgreSQL goes away
//!
//! A connection the server closed or that broke fails every later call, and the postgres
//! crate says so (`is_closed`). The next call after that opens a new connection, which
//! takes one attempt of at most the connect timeout (a second, or the URL's
//! `connect_timeout`): a database that is down refuses at once, so each write and each read
//! that needs it fails within about that second, and answers 503 ([`PgError::is_unavailable`]),
//! and the first call after the database is back goes through. Nothing is retried inside:
//! a batch that failed is answered as failed, and its producers retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Ack, Append, Database, Outcome as Stored, PgError, Sweep};
use crate::clock::wall_ms;
use crate::store::StoreError;
use crate::store::retention::Retention;
use crate::store::writer::{Job, Log, Outcome, WriteError};

/// A connection that is opened when first needed, and again after it broke.
pub struct Connection {
    url: String,
    db: Option<Database>,
}

impl Connection {
    /// A connection to the database `url` names, not opened yet.
    pub fn new(url: &str) -> Connection {
        Connection {
            url: url.to_owned(),
            db: None,
        }
    }

    /// Runs `call` on the open connection, opening one first if there is none; a
    /// connection that broke during the call is let go, for the next call to replace.
    pub fn with<T>(
        &mut self,
        call: impl FnOnce(&mut Database) -> Result<T, PgError>,
    ) -> Result<T, StoreError> {
        let db = match &mut self.db {
            Some(db) => db,
            None => self.db.insert(Database::open(&self.url)?),
        };
        let result = call(db);
        // A server going down answers the call in flight (57P01) before it closes the
        // connection: let go of it then too, or the next call fails on it once more.
        if db.is_closed() || result.as_ref().is_err_and(PgError::is_unavailable) {
            self.db = None;
        }
        Ok(result?)
    }
}

/// The writer's log on PostgreSQL: its connection, the name its heartbeat row has, and
/// the retention run under way.
pub struct Writes {
    conn: Connection,
    node: String,
    sweep: Option<Sweep>,
    /// When the database's clock was last measured.
    measured: Option<Instant>,
}

/// How often the writer measures the database's clock again: often enough that neither
/// host's drift (parts per million) nor a step of its clock lasts.
const MEASURE_EVERY: Duration = Duration::from_secs(10);

impl Writes {
    /// The writer's log for node `node` on the database `url` names.
    pub fn new(url: &str, node: String) -> Writes {
        Writes {
            conn: Connection::new(url),
            node,
            sweep: None,
            measured: None,
        }
    }

    /// The newest event time of any stream, where the node's clock starts.
    pub fn newest_timestamp(&mut self) -> Result<u64, StoreError> {
        self.conn.with(Database::newest_timestamp)
    }
}

impl Log for Writes {
    fn apply(&mut self, batch: &[Job], ts: u64) -> Result<Vec<Outcome>, StoreError> {
        let mut appends = Vec::new();
        let mut acks = Vec::new();
        let mut heartbeat = false;
        for job in batch {
            match job {
                Job::Append {
                    stream,
                    producer,
                    payload,
                    ..
                } => appends.push(Append {
                    stream,
                    producer: producer.as_deref(),
                    payload,
                }),
                Job::Ack {
                    stream,
                    consumer,
                    id,
                    ..
                } => acks.push(Ack {
                    stream,
                    consumer,
                    id: *id,
                }),
                Job::Heartbeat(_) => heartbeat = true,
                Job::Retain(_) | Job::Stop => {}
            }
        }
        let node = heartbeat.then_some(self.node.as_str());
        let (stored, found) = self.conn.with(|db| db.write(&appends, &acks, node, ts))?;
        let (mut stored, mut found) = (stored.into_iter(), found.into_iter());
        // The index of each stream in the batch's list of appended streams, in the order
        // of their first event, as the commit hook expects.
        let mut slots: HashMap<&str, usize> = HashMap::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for job in batch {
            let outcome = match job {
                Job::Append { stream, .. } => match stored.next() {
                    Some(Stored::Stored(event)) => {
                        let next = slots.len();
                        let slot = *slots.entry(stream).or_insert(next);
                        Outcome::Appended(slot, Arc::new(event))
                    }
                    Some(Stored::Locked) => Outcome::Refused(WriteError::Locked),
                    None => return Err(StoreError::Invariant("an append had no outcome")),
                },
                Job::Ack { .. } => match found.next() {
                    Some(true) => Outcome::Finished,
                    Some(false) => Outcome::Refused(WriteError::NotFound),
                    None => return Err(StoreError::Invariant("an ACK had no outcome")),
                },
                Job::Heartbeat(_) | Job::Retain(_) | Job::Stop => Outcome::Finished,
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    fn failed(&mut self, what: &str, e: &StoreError) {
        crate::log::error(&format!("{what} failed: {e}"));
    }

    fn clock_offset(&mut self) -> Option<i64> {
        if self.measured.is_some_and(|at| at.elapsed() < MEASURE_EVERY) {
            return None;
        }
        self.measured = Some(Instant::now());
        let before = wall_ms();
        let theirs = self.conn.with(|db| {
            let row = db.client.query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )?;
            Ok(row.get::<_, i64>(0))
        });
        let after = wall_ms();
        match theirs {
            // The database read its clock about halfway through the round trip.
            Ok(theirs) => Some(theirs - (before / 2 + after / 2) as i64),
            Err(e) => {
                crate::log::warn(&format!("could not read the database's clock: {e}"));
                None
            }
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
        let Some(mut run) = self.sweep.take() else {
            return;
        };
        // Another node holding the retention lock ends the run here: it is deleting.
        match self.conn.with(|db| db.retain(&mut run, ts)) {
            Ok(true) => self.sweep = Some(run),
            Ok(false) => {}
            Err(e) => crate::log::error(&format!("retention failed: {e}")),
        }
    }
}
