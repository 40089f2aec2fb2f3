//! Appends on PostgreSQL: a node's batch of appends in one transaction (group commit), in a
//! total order with every other node's.
//!
//! [`commit`] is what a node's writer thread will call for each batch it takes from its queue,
//! as the SQLite writer's `apply` is: one transaction, one commit (so one flush of
//! PostgreSQL's WAL) for the whole batch, then the outcomes.
//!
//! # Order across nodes
//!
//! A batch locks the row of every stream it appends to before writing, in name order, and
//! holds the locks until it commits. Another node's batch for the same stream waits on the
//! row lock, then reads the sequence number and timestamp this one left: sequence numbers
//! are gapless and totally ordered, and timestamps never decrease along a stream even when
//! the nodes' clocks disagree (a batch stamps each stream at the later of its own time and
//! the stream's last). Taking the locks in one order (names sorted) means two batches
//! touching the same streams never wait on each other in a cycle: no deadlock, whatever
//! the order of their appends.
//!
//! Before it commits, a batch announces each stream it appended to, with its newest
//! sequence number, to every node's listener ([`super::listen`]); they hear it at the commit.

use std::collections::{BTreeSet, HashMap};

use postgres::{Client, Transaction};
use uuid::Uuid;

use super::PgError;
use crate::event::Event;
use crate::store::schema::render;
use crate::store::writer::Payload;

/// One append of a batch.
pub struct Append<'a> {
    /// Stream name.
    pub stream: &'a str,
    /// The producer writing, if any; `None` neither claims nor may write owned streams.
    pub producer: Option<&'a str>,
    /// What to store.
    pub payload: &'a Payload,
}

/// What became of one append of a committed batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored as this event.
    Stored(Event),
    /// The stream belongs to another producer (the producer lock: 423).
    Locked,
}

/// A stream row, locked by the batch's transaction.
struct StreamRow {
    id: i64,
    owner: Option<String>,
    last_seq: i64,
    /// The batch's timestamp for this stream: never below the stream's last.
    ts: u64,
    appended: bool,
}

/// Appends `batch` in one transaction stamped `ts` (epoch ms, from the node's clock), and
/// returns each append's outcome in order. A failure fails the whole batch and stores
/// nothing.
pub fn commit(client: &mut Client, batch: &[Append<'_>], ts: u64) -> Result<Vec<Outcome>, PgError> {
    let mut tx = client.transaction()?;
    let outcomes = apply(&mut tx, batch, ts)?;
    tx.commit()?;
    Ok(outcomes)
}

/// Appends `batch` inside `tx`, which commits it with whatever else it holds.
pub(super) fn apply(
    tx: &mut Transaction<'_>,
    batch: &[Append<'_>],
    ts: u64,
) -> Result<Vec<Outcome>, PgError> {
    // In name order (a BTreeSet's), so that batches never wait on each other in a cycle.
    let names: BTreeSet<&str> = batch.iter().map(|a| a.stream).collect();
    let mut streams = HashMap::with_capacity(names.len());
    for name in names {
        streams.insert(name, lock(tx, name, ts)?);
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    // The stream of each stored event, in order.
    let mut stream_ids = Vec::with_capacity(batch.len());
    for append in batch {
        let stream = streams
            .get_mut(append.stream)
            .expect("every stream of the batch is locked");
        match (&stream.owner, append.producer) {
            (Some(owner), Some(p)) if owner == p => {}
            (Some(_), _) => {
                outcomes.push(Outcome::Locked);
                continue;
            }
            (None, Some(p)) => stream.owner = Some(p.to_owned()),
            (None, None) => {}
        }
        stream.last_seq += 1;
        stream.appended = true;
        let event = render(append.payload, stream.last_seq as u64, stream.ts);
        stream_ids.push(stream.id);
        outcomes.push(Outcome::Stored(event));
    }
    let rows = Rows::of(&outcomes, stream_ids);
    // One statement for every event of the batch: a round trip per event would cost more
    // than the commit.
    tx.execute(
        "INSERT INTO events (stream_id, seq, id, name, ts, data) \
         SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::UUID[], $4::TEXT[], \
                              $5::BIGINT[], $6::TEXT[])",
        &[
            &rows.stream_id,
            &rows.seq,
            &rows.id,
            &rows.name,
            &rows.ts,
            &rows.data,
        ],
    )?;
    for (name, stream) in streams.iter().filter(|(_, s)| s.appended) {
        super::listen::notify(tx, name, stream.last_seq as u64)?;
        tx.execute(
            "UPDATE streams SET owner = $2, last_seq = $3, last_ms = $4 WHERE id = $1",
            &[
                &stream.id,
                &stream.owner,
                &stream.last_seq,
                &(stream.ts as i64),
            ],
        )?;
    }
    Ok(outcomes)
}

/// Locks the row of stream `name`, creating it (unowned) if it does not exist; `ts` is
/// raised to the stream's last timestamp.
///
/// Of two transactions creating the same stream, the second's insert waits for the first
/// to commit and then does nothing, and its lock finds the row as the first left it (owned,
/// if the first one's producer claimed it).
fn lock(tx: &mut Transaction<'_>, name: &str, ts: u64) -> Result<StreamRow, PgError> {
    const LOCK: &str =
        "SELECT id, owner, last_seq, last_ms FROM streams WHERE name = $1 FOR NO KEY UPDATE";
    loop {
        if let Some(row) = tx.query_opt(LOCK, &[&name])? {
            let last_ms: i64 = row.get(3);
            return Ok(StreamRow {
                id: row.get(0),
                owner: row.get(1),
                last_seq: row.get(2),
                ts: ts.max(last_ms.max(0) as u64),
                appended: false,
            });
        }
        let created = tx.query_opt(
            "INSERT INTO streams (name, created_ms) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING RETURNING id",
            &[&name, &(ts as i64)],
        )?;
        // Created: the insert holds the row until commit. Otherwise another transaction
        // created it and has committed by now: lock what it left.
        if let Some(row) = created {
            return Ok(StreamRow {
                id: row.get(0),
                owner: None,
                last_seq: 0,
                ts,
                appended: false,
            });
        }
    }
}

/// The batch's events as columns, for one `INSERT … SELECT FROM unnest(…)`.
struct Rows<'a> {
    stream_id: Vec<i64>,
    seq: Vec<i64>,
    id: Vec<Uuid>,
    name: Vec<Option<&'a str>>,
    ts: Vec<i64>,
    data: Vec<&'a str>,
}

impl<'a> Rows<'a> {
    /// The stored events of `outcomes`, the `n`th in stream `stream_ids[n]`.
    fn of(outcomes: &'a [Outcome], stream_ids: Vec<i64>) -> Rows<'a> {
        let events: Vec<&Event> = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::Stored(event) => Some(event),
                Outcome::Locked => None,
            })
            .collect();
        Rows {
            stream_id: stream_ids,
            seq: events.iter().map(|e| e.seq as i64).collect(),
            id: events.iter().map(|e| e.id).collect(),
            name: events.iter().map(|e| e.name.as_deref()).collect(),
            ts: events.iter().map(|e| e.ts as i64).collect(),
            data: events.iter().map(|e| &*e.data).collect(),
        }
    }
}
