//! Read connections: one per worker, each read in its own snapshot, never waiting for the
//! writer (WAL readers do not block on it).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::StoreError;
use super::admin::{CONSUMERS, ConsumerOffset, StreamSummary, consumer_offset};
use super::schema::stored_element;
use crate::event::{Event, Start};

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// The argon2id hash of the password.
    pub hash: String,
    /// Comma-separated stream patterns the user may write.
    pub produce: String,
    /// Comma-separated stream patterns the user may read.
    pub consume: String,
}

/// A stream's catalogue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// Internal id.
    pub id: i64,
    /// The producer that owns it, if claimed.
    pub owner: Option<String>,
    /// Sequence number of its newest event (0 when empty).
    pub last_seq: u64,
}

/// What a streams-API consumer may read next, seen in one snapshot.
#[derive(Debug)]
pub struct ConsumeView {
    /// Elements (JSON) after the consumer's offset, oldest first.
    pub events: Vec<String>,
    /// The stream's newest sequence number in the same snapshot.
    pub hwm: u64,
}

/// Events after a long-poll start, seen in one snapshot.
#[derive(Debug)]
pub struct SinceView {
    /// Events after the resolved cursor, oldest first.
    pub events: Vec<Event>,
    /// The stream's newest sequence number in the same snapshot (0 if it does not exist).
    pub hwm: u64,
}

/// A worker's read connection, on the engine `--db` names; each read is the same query on
/// either, with the same answer.
pub enum Reader {
    /// A read connection on the SQLite file.
    Sqlite(Sqlite),
    /// A connection to the shared PostgreSQL database, reopened after it broke. Reads take
    /// `&self` where SQLite's do (a worker's reader is its own, so the cell is never
    /// contended).
    #[cfg(feature = "postgres")]
    Pg(Box<std::cell::RefCell<super::pg::Connection>>),
}

/// Runs the same read on whichever engine `$reader` is: `$r` is the SQLite reader or the
/// PostgreSQL database.
macro_rules! on_engine {
    ($reader:expr, $r:ident => $read:expr) => {
        match $reader {
            Reader::Sqlite($r) => $read,
            #[cfg(feature = "postgres")]
            Reader::Pg(conn) => conn.borrow_mut().read(|$r| $read),
        }
    };
}

impl Reader {
    /// A read connection on the database `--db` names: a SQLite file, or (built with the
    /// `postgres` feature) a PostgreSQL URL.
    pub fn open(db: &Path) -> Result<Reader, StoreError> {
        #[cfg(feature = "postgres")]
        if crate::config::Engine::of(db) == crate::config::Engine::Postgres {
            let url = db.to_str().ok_or(StoreError::NotUtf8(db.to_owned()))?;
            let mut conn = super::pg::Connection::new(url);
            // Connect now, so a node that cannot reach its database fails at start.
            conn.read(|_| Ok(()))?;
            return Ok(Reader::Pg(Box::new(std::cell::RefCell::new(conn))));
        }
        Ok(Reader::Sqlite(Sqlite::open(db)?))
    }

    /// See [`Sqlite::user`].
    pub fn user(&self, user: &str) -> Result<Option<UserRecord>, StoreError> {
        on_engine!(self, r => r.user(user))
    }

    /// See [`Sqlite::consume`].
    pub fn consume(
        &mut self,
        stream: &str,
        consumer: &str,
        name: &str,
        limit: usize,
    ) -> Result<Option<ConsumeView>, StoreError> {
        on_engine!(self, r => r.consume(stream, consumer, name, limit))
    }

    /// See [`Sqlite::since`].
    pub fn since(
        &mut self,
        stream: &str,
        start: &Start,
        name: Option<&str>,
        limit: usize,
    ) -> Result<SinceView, StoreError> {
        on_engine!(self, r => r.since(stream, start, name, limit))
    }

    /// See [`Sqlite::seq_of`].
    pub fn seq_of(&self, stream: &str, id: &Uuid) -> Result<Option<u64>, StoreError> {
        on_engine!(self, r => r.seq_of(stream, id))
    }

    /// The sequence number of `stream`'s newest event on the shared database (0 if it has
    /// none), to tell whether memory has heard of every commit of other nodes.
    #[cfg(feature = "postgres")]
    pub fn head(&self, stream: &str) -> Result<u64, StoreError> {
        match self {
            Reader::Sqlite(r) => Ok(stream_info(&r.conn, stream)?.map_or(0, |i| i.last_seq)),
            Reader::Pg(conn) => conn.borrow_mut().read(|db| db.head(stream)),
        }
    }

    /// See [`Sqlite::consumer_lag`].
    pub fn consumer_lag(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        on_engine!(self, r => r.consumer_lag())
    }

    /// See [`Sqlite::retention_held`].
    pub fn retention_held(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        on_engine!(self, r => r.retention_held())
    }

    /// See [`Sqlite::overview`].
    pub fn overview(
        &mut self,
        visible: impl Fn(&str) -> bool,
        max_streams: usize,
        max_consumers: usize,
    ) -> Result<Overview, StoreError> {
        on_engine!(self, r => r.overview(&visible, max_streams, max_consumers))
    }
}

/// A worker's read connection on the SQLite file.
pub struct Sqlite {
    conn: Connection,
}

impl Sqlite {
    /// Opens a read connection on the database at `path`.
    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
        Ok(Sqlite {
            conn: super::open_read(path)?,
        })
    }

    /// The stored password hash of `user` and the stream patterns it may produce to and
    /// consume from.
    pub fn user(&self, user: &str) -> Result<Option<UserRecord>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT hash, produce, consume FROM users WHERE name = ?1")?
            .query_row([user], |r| {
                Ok(UserRecord {
                    hash: r.get(0)?,
                    produce: r.get(1)?,
                    consume: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// Up to `limit` events named `name` after `consumer`'s offset; `None` if the stream
    /// does not exist.
    pub fn consume(
        &mut self,
        stream: &str,
        consumer: &str,
        name: &str,
        limit: usize,
    ) -> Result<Option<ConsumeView>, StoreError> {
        let tx = self.conn.transaction()?;
        let Some(info) = stream_info(&tx, stream)? else {
            return Ok(None);
        };
        let offset: i64 = tx
            .prepare_cached(
                "SELECT seq FROM offsets WHERE stream_id = ?1 AND consumer = ?2 AND name = ?3",
            )?
            .query_row(params![info.id, consumer, name], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let events = tx
            .prepare_cached(
                "SELECT id, seq, ts, data FROM events WHERE stream_id = ?1 AND name = ?2 \
                 AND seq > ?3 ORDER BY seq LIMIT ?4",
            )?
            .query_map(params![info.id, name, offset, limit as i64], |r| {
                let (id, seq, ts) = (id(r.get(0)?), r.get::<_, i64>(1)?, r.get::<_, i64>(2)?);
                Ok(stored_element(&id, seq as u64, ts as u64, r.get(3)?))
            })?
            .collect::<Result<Vec<String>, _>>()?;
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
    ) -> Result<SinceView, StoreError> {
        let tx = self.conn.transaction()?;
        let Some(info) = stream_info(&tx, stream)? else {
            return Ok(SinceView {
                events: Vec::new(),
                hwm: 0,
            });
        };
        let cursor = resolve(&tx, &info, start)?;
        let mut stmt = tx.prepare_cached(
            "SELECT seq, ts, id, name, data FROM events WHERE stream_id = ?1 AND seq > ?2 \
             AND (?3 IS NULL OR name = ?3) ORDER BY seq LIMIT ?4",
        )?;
        let events = stmt
            .query_map(params![info.id, cursor as i64, name, limit as i64], |r| {
                let (seq, ts, id) = (
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)?,
                    id(r.get(2)?),
                );
                let name: Option<String> = r.get(3)?;
                let data: String = r.get(4)?;
                let data = match name {
                    Some(_) => stored_element(&id, seq, ts as u64, data),
                    None => data,
                };
                Ok(Event {
                    seq,
                    ts: ts as u64,
                    id,
                    name: name.map(String::into_boxed_str),
                    data: data.into_boxed_str(),
                })
            })?
            .collect::<Result<Vec<Event>, _>>()?;
        Ok(SinceView {
            events,
            hwm: info.last_seq,
        })
    }

    /// The sequence number of the event `id` of `stream`, if it is stored.
    pub fn seq_of(&self, stream: &str, id: &Uuid) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT e.seq FROM events e JOIN streams s ON s.id = e.stream_id \
                 WHERE e.id = ?1 AND s.name = ?2",
            )?
            .query_row(params![&id.as_bytes()[..], stream], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|seq| seq as u64))
    }
}

impl Sqlite {
    /// Unacknowledged events per (stream, consumer, event name), for metrics.
    pub fn consumer_lag(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT s.name, o.consumer, o.name, \
             (SELECT count(*) FROM events e WHERE e.stream_id = o.stream_id \
              AND e.name = o.name AND e.seq > o.seq) \
             FROM offsets o JOIN streams s ON s.id = o.stream_id ORDER BY 1, 2, 3",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

impl Sqlite {
    /// What interest retention held back at its last run, per (stream, consumer), for
    /// metrics.
    pub fn retention_held(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT s.name, h.consumer, h.events \
             FROM retention_held h JOIN streams s ON s.id = h.stream_id ORDER BY 1, 2",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

/// A stream as the status page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    /// Its name, owner and event count.
    pub summary: StreamSummary,
    /// Its consumers' offsets and lag.
    pub consumers: Vec<ConsumerOffset>,
}

/// What the status page shows of the store, in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overview {
    /// The first streams by name that were asked for.
    pub streams: Vec<StreamStatus>,
    /// Whether more streams were left out.
    pub more_streams: bool,
    /// Whether consumers of the listed streams were left out.
    pub more_consumers: bool,
}

impl Sqlite {
    /// The first `max_streams` streams by name that `visible` admits, with their event
    /// counts and their first `max_consumers` consumers (in all). Names are walked without
    /// counting; only the listed streams are counted, each through its index, so the work
    /// grows with what is listed and the events it holds, never with the streams skipped.
    pub fn overview(
        &mut self,
        visible: impl Fn(&str) -> bool,
        max_streams: usize,
        max_consumers: usize,
    ) -> Result<Overview, StoreError> {
        let tx = self.conn.transaction()?;
        let mut listed = Vec::new();
        let mut more_streams = false;
        {
            let mut stmt = tx.prepare_cached(
                "SELECT name, owner, last_seq, last_ms, id FROM stream_heads ORDER BY name",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let name: String = row.get(0)?;
                if !visible(&name) {
                    continue;
                }
                if listed.len() == max_streams {
                    more_streams = true;
                    break;
                }
                let summary = StreamSummary {
                    name,
                    owner: row.get(1)?,
                    events: 0,
                    last_seq: row.get::<_, i64>(2)? as u64,
                    last_ms: row.get::<_, i64>(3)? as u64,
                };
                listed.push((summary, row.get::<_, i64>(4)?));
            }
        }
        let mut streams = Vec::with_capacity(listed.len());
        let mut room = max_consumers;
        let mut more_consumers = false;
        for (mut summary, id) in listed {
            summary.events = tx
                .prepare_cached("SELECT count(*) FROM events WHERE stream_id = ?1")?
                .query_row([id], |r| r.get::<_, i64>(0))? as u64;
            let mut consumers = Vec::new();
            let mut stmt = tx.prepare_cached(&format!("{CONSUMERS} LIMIT ?2"))?;
            let mut rows = stmt.query(params![id, room as i64 + 1])?;
            while let Some(row) = rows.next()? {
                if consumers.len() == room {
                    more_consumers = true;
                    break;
                }
                consumers.push(consumer_offset(row)?);
            }
            room -= consumers.len();
            streams.push(StreamStatus { summary, consumers });
        }
        Ok(Overview {
            streams,
            more_streams,
            more_consumers,
        })
    }
}

/// An event id as stored: 16 bytes (anything else, which this server never stores, reads
/// as the nil id).
fn id(bytes: Vec<u8>) -> Uuid {
    Uuid::from_slice(&bytes).unwrap_or_default()
}

/// The catalogue entry of `stream`, if it exists.
pub(super) fn stream_info(
    conn: &Connection,
    stream: &str,
) -> Result<Option<StreamInfo>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id, owner, last_seq FROM stream_heads WHERE name = ?1")?
        .query_row([stream], |r| {
            Ok(StreamInfo {
                id: r.get(0)?,
                owner: r.get(1)?,
                last_seq: r.get::<_, i64>(2)? as u64,
            })
        })
        .optional()?)
}

/// Turns a start into the sequence number the reader has seen up to.
fn resolve(conn: &Connection, info: &StreamInfo, start: &Start) -> Result<u64, StoreError> {
    let (ms, last_id) = match start {
        Start::Now => return Ok(info.last_seq),
        Start::After(seq) => return Ok(*seq),
        Start::Since { ms, last_id } => (i64::try_from(*ms).unwrap_or(i64::MAX), last_id),
    };
    if let Some(id) = last_id {
        let at: Option<(i64, i64)> = conn
            .prepare_cached("SELECT seq, ts FROM events WHERE id = ?1 AND stream_id = ?2")?
            .query_row(params![&id.as_bytes()[..], info.id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((seq, ts)) = at
            && ts == ms
        {
            return Ok(seq as u64);
        }
    }
    // Without a usable last_id: everything at exactly `ms` is new when a last_id was given
    // (the client saw none of them), and already seen when it was not.
    super::seq_at_time(conn, info.id, ms, last_id.is_some())
}
