//! The operator commands on PostgreSQL: the statements of `store::admin` on the same
//! tables, so `user`, `stream` and `consumer` answer as they do on SQLite. The password arrives already hashed (`auth::hash_password`), as on
//! SQLite. Names sort bytewise (`COLLATE "C"`), as SQLite sorts them.

use postgres::Row;

use super::read::{snapshot, stream_info};
use super::{Database, PgError};
use crate::clock::wall_ms;
use crate::store::admin::{Added, ConsumerOffset, OffsetOf, Reset, StreamDetail, StreamSummary};

/// Each stream with its event count; the `streams` row holds the rest, and `s.id` comes
/// last, for [`summary`].
const SUMMARY: &str = "SELECT s.name, s.owner, \
     (SELECT count(*) FROM events e WHERE e.stream_id = s.id), s.last_seq, s.last_ms, s.id \
     FROM streams s";

/// A row of [`SUMMARY`], and the stream's id.
fn summary(r: &Row) -> (StreamSummary, i64) {
    let summary = StreamSummary {
        name: r.get(0),
        owner: r.get(1),
        events: r.get::<_, i64>(2) as u64,
        last_seq: r.get::<_, i64>(3) as u64,
        last_ms: r.get::<_, i64>(4) as u64,
    };
    (summary, r.get(5))
}

/// The consumers of stream `$1` with their offsets and lag, by consumer and event name;
/// each lag counts through the `events_by_name` index.
pub(super) const CONSUMERS: &str = "SELECT o.consumer, o.name, o.seq, (SELECT count(*) \
     FROM events e WHERE e.stream_id = o.stream_id AND e.name = o.name AND e.seq > o.seq) \
     FROM offsets o WHERE o.stream_id = $1 ORDER BY o.consumer COLLATE \"C\", o.name COLLATE \"C\"";

/// A row of [`CONSUMERS`].
pub(super) fn consumer_offset(r: &Row) -> ConsumerOffset {
    ConsumerOffset {
        consumer: r.get(0),
        event_name: r.get(1),
        offset: r.get::<_, i64>(2) as u64,
        lag: r.get::<_, i64>(3) as u64,
    }
}

impl Database {
    /// Adds `user` with the given password hash and stream patterns, or replaces all three
    /// for an existing user; one statement, so two nodes adding one name cannot both create it.
    pub fn put_user(
        &mut self,
        user: &str,
        hash: &str,
        produce: &str,
        consume: &str,
    ) -> Result<Added, PgError> {
        let created_ms = i64::try_from(wall_ms()).unwrap_or(i64::MAX);
        // `xmax = 0` holds for a row this statement inserted, not for one it updated.
        let inserted: bool = self
            .client
            .query_one(
                "INSERT INTO users (name, hash, produce, consume, created_ms)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE
                     SET hash = EXCLUDED.hash, produce = EXCLUDED.produce,
                         consume = EXCLUDED.consume
                 RETURNING xmax = 0",
                &[&user, &hash, &produce, &consume, &created_ms],
            )?
            .get(0);
        Ok(match inserted {
            true => Added::Created,
            false => Added::Replaced,
        })
    }

    /// Adds `user` with the given password hash, allowed every stream, if there is no user
    /// yet; false if there is one. Of two nodes doing this at once, both may find no user,
    /// but the second's insert waits for the first's on the name's unique index and then
    /// does nothing.
    pub fn add_first_user(&mut self, user: &str, hash: &str) -> Result<bool, PgError> {
        let created_ms = i64::try_from(wall_ms()).unwrap_or(i64::MAX);
        let added = self.client.execute(
            "INSERT INTO users (name, hash, produce, consume, created_ms)
             SELECT $1, $2, '*', '*', $3 WHERE NOT EXISTS (SELECT 1 FROM users)
             ON CONFLICT (name) DO NOTHING",
            &[&user, &hash, &created_ms],
        )?;
        Ok(added == 1)
    }

    /// All users as (name, produce patterns, consume patterns), sorted by name (bytewise,
    /// as SQLite sorts).
    pub fn list_users(&mut self) -> Result<Vec<(String, String, String)>, PgError> {
        let rows = self.client.query(
            "SELECT name, produce, consume FROM users ORDER BY name COLLATE \"C\"",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Removes `user`; false if there was no such user.
    pub fn remove_user(&mut self, user: &str) -> Result<bool, PgError> {
        Ok(self
            .client
            .execute("DELETE FROM users WHERE name = $1", &[&user])?
            > 0)
    }

    /// All streams, by name.
    pub fn list_streams(&mut self) -> Result<Vec<StreamSummary>, PgError> {
        let sql = format!("{SUMMARY} ORDER BY s.name COLLATE \"C\"");
        let rows = self.client.query(&sql, &[])?;
        Ok(rows.iter().map(|r| summary(r).0).collect())
    }

    /// One stream in detail, all of it from one snapshot; `None` if it does not exist.
    pub fn show_stream(&mut self, name: &str) -> Result<Option<StreamDetail>, PgError> {
        let mut tx = snapshot(self)?;
        let found = tx.query_opt(&format!("{SUMMARY} WHERE s.name = $1"), &[&name])?;
        let Some((summary, id)) = found.as_ref().map(summary) else {
            return Ok(None);
        };
        let first_ms: i64 = tx
            .query_one(
                "SELECT coalesce((SELECT ts FROM events WHERE stream_id = $1 \
                 ORDER BY seq LIMIT 1), 0)",
                &[&id],
            )?
            .get(0);
        let consumers = tx.query(CONSUMERS, &[&id])?;
        let held = tx.query(
            "SELECT consumer, events FROM retention_held WHERE stream_id = $1 \
             ORDER BY consumer COLLATE \"C\"",
            &[&id],
        )?;
        tx.commit()?;
        Ok(Some(StreamDetail {
            summary,
            first_ms: first_ms as u64,
            consumers: consumers.iter().map(consumer_offset).collect(),
            held: held
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect(),
        }))
    }

    /// Forgets a consumer of a stream: its offsets, and what retention held back for it.
    /// `None` if the stream does not exist; else the number of offsets (event names) it had
    /// there, 0 if it was unknown.
    pub fn remove_consumer(
        &mut self,
        stream: &str,
        consumer: &str,
    ) -> Result<Option<usize>, PgError> {
        let mut tx = self.client.transaction()?;
        let Some(info) = stream_info(&mut tx, stream)? else {
            return Ok(None);
        };
        let removed = tx.execute(
            "DELETE FROM offsets WHERE stream_id = $1 AND consumer = $2",
            &[&info.id, &consumer],
        )?;
        tx.execute(
            "DELETE FROM retention_held WHERE stream_id = $1 AND consumer = $2",
            &[&info.id, &consumer],
        )?;
        tx.commit()?;
        Ok(Some(usize::try_from(removed).unwrap_or(usize::MAX)))
    }

    /// Clears a stream's producer lock; false if the stream does not exist.
    pub fn release_stream(&mut self, name: &str) -> Result<bool, PgError> {
        let sql = "UPDATE streams SET owner = NULL WHERE name = $1";
        Ok(self.client.execute(sql, &[&name])? > 0)
    }

    /// Sets a consumer's offset for one event name (forwards or back), from 0 to the
    /// stream's newest sequence number. The stream row is locked, so no append through a
    /// node moves the newest between the check and the write.
    pub fn reset_consumer(&mut self, of: OffsetOf<'_>, offset: u64) -> Result<Reset, PgError> {
        let mut tx = self.client.transaction()?;
        let row = tx.query_opt(
            "SELECT id, last_seq FROM streams WHERE name = $1 FOR SHARE",
            &[&of.stream],
        )?;
        let Some((id, newest)) = row.map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1) as u64))
        else {
            return Ok(Reset::NoStream);
        };
        if offset > newest {
            return Ok(Reset::PastNewest(newest));
        }
        tx.execute(
            "INSERT INTO offsets (stream_id, consumer, name, seq) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream_id, consumer, name) DO UPDATE SET seq = EXCLUDED.seq",
            &[&id, &of.consumer, &of.event_name, &(offset as i64)],
        )?;
        tx.commit()?;
        Ok(Reset::Done)
    }
}
