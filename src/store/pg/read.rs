//! Reads on PostgreSQL: the queries of the SQLite `Reader`, with the same answers and the
//! same types, so that the APIs cannot tell the stores apart.
//!
//! Each read that takes several statements runs in one `REPEATABLE READ`, read-only
//! transaction: one snapshot, as a WAL reader's transaction is on SQLite, so a view's
//! events and its high-water mark agree. The high-water mark is the `streams` row's
//! `last_seq`: every append sets it ([`super::append`]) and a deletion leaves it, so, as on
//! SQLite, it is the newest sequence number the stream ever gave, whatever was deleted since.
//!
//! A `since_time` is found as SQLite finds it: by a binary search over `seq` (timestamps
//! never decrease along a stream), each probe one step down the primary key, so no index on
//! `ts` is needed and no read scans a stream.

use postgres::{IsolationLevel, Transaction};
use uuid::Uuid;

use super::{Database, PgError};
use crate::event::{Event, Start};
use crate::store::reader::{ConsumeView, SinceView, StreamInfo, UserRecord};
use crate::store::schema::stored_element;

/// The first stored event of a stream at or after a sequence number, by the primary key.
const FIRST_AT_OR_AFTER: &str =
    "SELECT seq, ts FROM events WHERE stream_id = $1 AND seq >= $2 ORDER BY seq LIMIT 1";

impl Database {
    /// The stored password hash of `user` and the stream patterns it may produce to and
    /// consume from.
    pub fn user(&mut self, user: &str) -> Result<Option<UserRecord>, PgError> {
        let row = self.client.query_opt(
            "SELECT hash, produce, consume FROM users WHERE name = $1",
            &[&user],
        )?;
        Ok(row.map(|r| UserRecord {
            hash: r.get(0),
            produce: r.get(1),
            consume: r.get(2),
        }))
    }

    /// Up to `limit` events named `name` after `consumer`'s offset, as streams-API
    /// elements; `None` if the stream does not exist.
    pub fn consume(
        &mut self,
        stream: &str,
        consumer: &str,
        name: &str,
        limit: usize,
    ) -> Result<Option<ConsumeView>, PgError> {
        let mut tx = snapshot(self)?;
        let Some(info) = stream_info(&mut tx, stream)? else {
            return Ok(None);
        };
        let offset: i64 = tx
            .query_opt(
                "SELECT seq FROM offsets WHERE stream_id = $1 AND consumer = $2 AND name = $3",
                &[&info.id, &consumer, &name],
            )?
            .map_or(0, |r| r.get(0));
        let events = tx
            .query(
                "SELECT id, seq, ts, data FROM events WHERE stream_id = $1 AND name = $2 \
                 AND seq > $3 ORDER BY seq LIMIT $4",
                &[&info.id, &name, &offset, &limit_of(limit)],
            )?
            .into_iter()
            .map(|r| {
                let (seq, ts): (i64, i64) = (r.get(1), r.get(2));
                stored_element(&r.get(0), seq as u64, ts as u64, r.get(3))
            })
            .collect();
        tx.commit()?;
        Ok(Some(ConsumeView {
            events,
            hwm: info.last_seq,
        }))
    }

    /// Up to `limit` events of `stream` after `start`, optionally only those named `name`.
    pub fn since(
        &mut self,
        stream: &str,
        start: &Start,
        name: Option<&str>,
        limit: usize,
    ) -> Result<SinceView, PgError> {
        let mut tx = snapshot(self)?;
        let Some(info) = stream_info(&mut tx, stream)? else {
            return Ok(SinceView {
                events: Vec::new(),
                hwm: 0,
            });
        };
        let cursor = resolve(&mut tx, &info, start)?;
        let rows = tx.query(
            "SELECT seq, ts, id, name, data FROM events WHERE stream_id = $1 AND seq > $2 \
             AND ($3::TEXT IS NULL OR name = $3) ORDER BY seq LIMIT $4",
            &[&info.id, &(cursor as i64), &name, &limit_of(limit)],
        )?;
        tx.commit()?;
        let events = rows
            .into_iter()
            .map(|r| {
                let (seq, ts, id): (i64, i64, Uuid) = (r.get(0), r.get(1), r.get(2));
                let (seq, ts) = (seq as u64, ts as u64);
                let name: Option<String> = r.get(3);
                let data: String = r.get(4);
                let data = match name {
                    Some(_) => stored_element(&id, seq, ts, data),
                    None => data,
                };
                Event {
                    seq,
                    ts,
                    id,
                    name: name.map(String::into_boxed_str),
                    data: data.into_boxed_str(),
                }
            })
            .collect();
        Ok(SinceView {
            events,
            hwm: info.last_seq,
        })
    }

    /// The sequence number of the event `id` of `stream`, if it is stored.
    pub fn seq_of(&mut self, stream: &str, id: &Uuid) -> Result<Option<u64>, PgError> {
        let row = self.client.query_opt(
            "SELECT e.seq FROM events e JOIN streams s ON s.id = e.stream_id \
             WHERE e.id = $1 AND s.name = $2",
            &[id, &stream],
        )?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    /// The sequence number of `stream`'s newest event (0 if it has none or does not
    /// exist), in one round trip.
    pub fn head(&mut self, stream: &str) -> Result<u64, PgError> {
        let row = self
            .client
            .query_opt("SELECT last_seq FROM streams WHERE name = $1", &[&stream])?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
    }
}

/// A read-only transaction whose statements all see one snapshot.
pub(super) fn snapshot(db: &mut Database) -> Result<Transaction<'_>, PgError> {
    Ok(db
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?)
}

/// A `LIMIT` as PostgreSQL takes it.
fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The catalogue entry of `stream`, if it exists.
pub(super) fn stream_info(
    tx: &mut Transaction<'_>,
    stream: &str,
) -> Result<Option<StreamInfo>, PgError> {
    let row = tx.query_opt(
        "SELECT id, owner, last_seq FROM streams WHERE name = $1",
        &[&stream],
    )?;
    Ok(row.map(|r| StreamInfo {
        id: r.get(0),
        owner: r.get(1),
        last_seq: r.get::<_, i64>(2) as u64,
    }))
}

/// Turns a start into the sequence number the reader has seen up to, as SQLite's reader
/// does.
fn resolve(tx: &mut Transaction<'_>, info: &StreamInfo, start: &Start) -> Result<u64, PgError> {
    let (ms, last_id) = match start {
        Start::Now => return Ok(info.last_seq),
        Start::After(seq) => return Ok(*seq),
        Start::Since { ms, last_id } => (i64::try_from(*ms).unwrap_or(i64::MAX), last_id),
    };
    if let Some(id) = last_id {
        let at = tx.query_opt(
            "SELECT seq, ts FROM events WHERE id = $1 AND stream_id = $2",
            &[id, &info.id],
        )?;
        if let Some(row) = at
            && row.get::<_, i64>(1) == ms
        {
            return Ok(row.get::<_, i64>(0) as u64);
        }
    }
    // Without a usable last_id: everything at exactly `ms` is new when a last_id was given
    // (the client saw none of them), and already seen when it was not.
    seq_at_time(tx, info.id, info.last_seq, ms, last_id.is_some())
}

/// The newest sequence number of stream `stream_id` whose event is older than `ms`
/// (`strict`) or not newer than `ms`; 0 if there is none: SQLite's search
/// (`store::bisect_time`), with the stream's `last_seq` as the upper bound.
pub(super) fn seq_at_time(
    tx: &mut Transaction<'_>,
    stream_id: i64,
    last_seq: u64,
    ms: i64,
    strict: bool,
) -> Result<u64, PgError> {
    let at_or_after = tx.prepare(FIRST_AT_OR_AFTER)?;
    crate::store::bisect_time(last_seq as i64, ms, strict, |mid| {
        let probe = tx.query_opt(&at_or_after, &[&stream_id, &mid])?;
        Ok(probe.map(|r| (r.get(0), r.get(1))))
    })
}
