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
//! The transaction only locks rows that exist: the streams of a batch that this connection
//! has not seen yet are created first ([`create`]), unowned, in a statement of their own
//! (a new stream's first producer claims it inside the batch, as with an existing unowned
//! one). Creating inside the transaction would wait on another batch's uncommitted insert
//! of the same name while holding locks, out of name order. Stream rows are never deleted,
//! so a connection remembers which exist. A batch that fails after creating its streams
//! leaves them empty, as a failed first append on SQLite does not.
//!
//! The round trips of a batch do not grow with its streams: one statement locks them all,
//! one inserts every event, one updates every stream row and announces each stream it
//! appended to, with its newest sequence number, to every node's listener
//! ([`super::listen`]); they hear it at the commit.

use std::collections::{BTreeSet, HashMap, HashSet};

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
pub fn commit(
    client: &mut Client,
    known: &mut Known,
    batch: &[Append<'_>],
    ts: u64,
) -> Result<Vec<Outcome>, PgError> {
    create(client, known, batch, ts)?;
    let mut tx = client.transaction()?;
    let outcomes = apply(&mut tx, batch, ts)?;
    tx.commit()?;
    Ok(outcomes)
}

/// The streams a connection knows exist: stream rows are never deleted.
#[derive(Default)]
pub(super) struct Known(HashSet<String>);

/// Most stream names a connection remembers; beyond it, it starts afresh.
const KNOWN_MAX: usize = 65_536;

/// Creates the streams of `batch` that `known` does not hold (unowned, where they do not
/// exist), in one statement of its own, and remembers them.
pub(super) fn create(
    client: &mut Client,
    known: &mut Known,
    batch: &[Append<'_>],
    ts: u64,
) -> Result<(), PgError> {
    let mut new: Vec<&str> = batch
        .iter()
        .map(|a| a.stream)
        .filter(|name| !known.0.contains(*name))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    // In name order, so that two of these creating the same streams never wait on each
    // other in a cycle.
    new.sort_unstable();
    new.dedup();
    client.execute(
        "INSERT INTO streams (name, created_ms) SELECT unnest($1::TEXT[]), $2 \
         ON CONFLICT (name) DO NOTHING",
        &[&new, &(ts as i64)],
    )?;
    if known.0.len() + new.len() > KNOWN_MAX {
        known.0.clear();
    }
    known.0.extend(new.into_iter().map(str::to_owned));
    Ok(())
}

/// Appends `batch` inside `tx`, which commits it with whatever else it holds. Its streams
/// exist ([`create`]).
pub(super) fn apply(
    tx: &mut Transaction<'_>,
    batch: &[Append<'_>],
    ts: u64,
) -> Result<Vec<Outcome>, PgError> {
    let mut streams = lock(tx, batch, ts)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    // The stream of each stored event, in order.
    let mut stream_ids = Vec::with_capacity(batch.len());
    for append in batch {
        let Some(stream) = streams.get_mut(append.stream) else {
            return Err(PgError::Invariant("a stream of the batch has no row"));
        };
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
    let appended: Vec<(&str, &StreamRow)> = streams
        .iter()
        .filter(|(_, s)| s.appended)
        .map(|(name, s)| (*name, s))
        .collect();
    let column = |f: fn(&str, &StreamRow) -> i64| -> Vec<i64> {
        appended.iter().map(|(name, s)| f(name, s)).collect()
    };
    let owners: Vec<Option<&str>> = appended.iter().map(|(_, s)| s.owner.as_deref()).collect();
    let notices: Vec<String> = appended
        .iter()
        .map(|(name, s)| super::listen::notice(name, s.last_seq as u64))
        .collect();
    tx.execute(
        "UPDATE streams s SET owner = u.owner, last_seq = u.last_seq, last_ms = u.last_ms \
         FROM unnest($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[]) \
              AS u (id, owner, last_seq, last_ms, notice) \
         WHERE s.id = u.id \
         RETURNING pg_notify($6, u.notice)",
        &[
            &column(|_, s| s.id),
            &owners,
            &column(|_, s| s.last_seq),
            &column(|_, s| s.ts as i64),
            &notices,
            &super::listen::CHANNEL,
        ],
    )?;
    Ok(outcomes)
}

/// Locks the rows of the streams of `batch`, in name order, in one statement; each
/// stream's timestamp for the batch is `ts` raised to its last. A stream without a row is
/// left out.
fn lock<'a>(
    tx: &mut Transaction<'_>,
    batch: &[Append<'a>],
    ts: u64,
) -> Result<HashMap<&'a str, StreamRow>, PgError> {
    let names: BTreeSet<&str> = batch.iter().map(|a| a.stream).collect();
    let names: Vec<&str> = names.into_iter().collect();
    // PostgreSQL sorts before it locks (the rows of a `SELECT … ORDER BY … FOR UPDATE` are
    // locked in the order returned), and every batch sorts the same way: no cycle.
    let rows = tx.query(
        "SELECT name, id, owner, last_seq, last_ms FROM streams WHERE name = ANY($1) \
         ORDER BY name COLLATE \"C\" FOR NO KEY UPDATE",
        &[&names],
    )?;
    let mut streams = HashMap::with_capacity(rows.len());
    for row in rows {
        let Ok(at) = names.binary_search(&row.get::<_, &str>(0)) else {
            continue;
        };
        let name = names[at];
        let last_ms: i64 = row.get(4);
        let stream = StreamRow {
            id: row.get(1),
            owner: row.get(2),
            last_seq: row.get(3),
            ts: ts.max(last_ms.max(0) as u64),
            appended: false,
        };
        streams.insert(name, stream);
    }
    Ok(streams)
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
