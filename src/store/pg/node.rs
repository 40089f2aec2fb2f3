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

use super::{Ack, Append, Database, Outcome as Stored, PgError};
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
        if db.is_closed() {
            self.db = None;
        }
        Ok(result?)
    }
}

/// The writer's log on PostgreSQL: its connection and the name its heartbeat row has.
pub struct Writes {
    conn: Connection,
    node: String,
}

impl Writes {
    /// The writer's log for node `node` on the database `url` names.
    pub fn new(url: &str, node: String) -> Writes {
        Writes {
            conn: Connection::new(url),
            node,
        }
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

    fn retain(&mut self, _limits: Retention) {
        crate::log::warn("retention does not run on PostgreSQL yet");
    }

    fn retaining(&self) -> bool {
        false
    }

    fn retain_chunk(&mut self, _ts: u64) {}
}
