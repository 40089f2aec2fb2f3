//! The schema: its migrations, and what the layout costs an append.
//!
//! One migration per entry of [`MIGRATIONS`]; entry `i` moves `PRAGMA user_version` from `i`
//! to `i + 1`. Never edit an entry that has shipped: append a new one. A database newer than
//! the list is refused ([`StoreError::TooNew`]), so an older eventserver never serves a
//! layout it does not know.
//!
//! # The layout
//!
//! Events are stored in commit order (`gid`), so a commit appends to the table's last pages
//! whatever streams it touches; ids are time-ordered (UUIDv7) for the same reason. The
//! per-stream indexes hold only keys. Timestamps need no index: they never decrease along a
//! stream, so a binary search over `seq` finds any time ([`super::seq_at_time`]).
//!
//! # What a commit writes
//!
//! A commit writes each page it changed to the write-ahead log once, as a frame of 4 KiB,
//! and syncs the log. Over many streams the per-stream indexes dominate: each stream a
//! commit appends to has its own last leaf in `events_by_seq` and, for named events, in
//! `events_by_name`, so a commit of 16 named events over 16 streams writes ~36 index leaves
//! and parents, against ~5 pages for the table and the id index together. Along one stream
//! the index tails are shared, but an index leaf that fills is rebalanced with its two left
//! siblings (SQLite's `balance_nonroot`; only table leaves split cheaply at their end), so
//! each index costs ~3-4 frames per commit of 64 events. Measured with `append_costs`
//! (`cargo test --release --lib append_costs -- --ignored --nocapture`), which counts the
//! log's frames:
//!
//! | a commit of | frames before schema 4 | from schema 4 |
//! |---|---|---|
//! | 64 `/publish` events to one stream | 11.8 | 10.9 |
//! | 16 `/publish` events over 16 of 64 streams | 23.5 | 22.5 |
//! | 64 `/publish` events over 64 streams | 79–81 | 79 |
//! | 64 streams-API events to one stream | 17.7 | 15.1 |
//! | 16 streams-API events over 16 of 64 streams | 43.7 | 41.6 |
//! | 64 streams-API events over 64 streams | 152–157 | 153 |
//!
//! Over one stream that is 8–15% fewer frames, and about half the bytes the server writes
//! per event under the load bench, checkpoints included (`-- publish --conns 64 --streams
//! 1`, `disk KiB/ev` in interleaved pairs: 1.5–2.6 KiB against 4.2–5.6 before); over 64
//! streams a frame or two per commit of ~80–150, and 10–25% fewer bytes.
//!
//! Schema 4 chose from those measurements:
//!
//! - **The `streams` row no longer changes with every commit.** A stream's newest sequence
//!   number and time are its newest stored event's, one step down `events_by_seq`
//!   (the view `stream_heads`); a trigger keeps those of the newest event deleted in the
//!   row, so that retention or an operator emptying a stream never lets a sequence number be
//!   given twice. One page and one `UPDATE` per stream per commit saved.
//! - **A named event's `data` holds only its members** (`,"event":…` and the rest, each
//!   preceded by a comma): `eventId`, `sequence` and `timestamp` are columns, and the
//!   element is put together when read ([`element`]). About 95 bytes per event saved, which
//!   along one stream is half the table's pages. Rows stored before schema 4 hold the whole
//!   element, which starts with `{`, and are served as they are.
//! - **Every index stays.** `events_by_seq` serves every read by position; `events_by_name`
//!   serves a consumer's read of one event name, which without it walks the whole stream
//!   (module docs of [`super`]); `events_by_id` serves ACKs and `last_id`, and at one frame
//!   or two per commit is the cheapest of the three.

use rusqlite::Connection;
use uuid::Uuid;

use super::StoreError;
use super::writer::Payload;
use crate::event::Event;

pub(super) const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        hash TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE streams (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        owner TEXT,
        last_seq INTEGER NOT NULL DEFAULT 0,
        last_ms INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE events (
        gid INTEGER PRIMARY KEY,
        stream_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        id BLOB NOT NULL,
        name TEXT,
        ts INTEGER NOT NULL,
        data TEXT NOT NULL
    );
    CREATE UNIQUE INDEX events_by_seq ON events (stream_id, seq);
    CREATE UNIQUE INDEX events_by_id ON events (id);
    CREATE INDEX events_by_name ON events (stream_id, name, seq) WHERE name IS NOT NULL;
    CREATE TABLE heartbeat (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL
    );
    CREATE TABLE offsets (
        stream_id INTEGER NOT NULL,
        consumer TEXT NOT NULL,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (stream_id, consumer, name)
    ) WITHOUT ROWID;
"#,
    r#"
    ALTER TABLE users ADD COLUMN produce TEXT NOT NULL DEFAULT '*';
    ALTER TABLE users ADD COLUMN consume TEXT NOT NULL DEFAULT '*';
"#,
    // What interest retention held back at its last run, per stream and consumer.
    r#"
    CREATE TABLE retention_held (
        stream_id INTEGER NOT NULL,
        consumer TEXT NOT NULL,
        events INTEGER NOT NULL,
        PRIMARY KEY (stream_id, consumer)
    ) WITHOUT ROWID;
"#,
    // From here on an append leaves the stream's row alone: its newest sequence number and
    // time are its newest stored event's (see `stream_heads`), and the row keeps those of
    // the newest event deleted, so that no sequence number is given twice.
    r#"
    CREATE TRIGGER events_deleted_newest AFTER DELETE ON events
    WHEN NOT EXISTS (SELECT 1 FROM events WHERE stream_id = old.stream_id AND seq > old.seq)
    BEGIN
        UPDATE streams SET last_seq = old.seq, last_ms = old.ts
        WHERE id = old.stream_id AND last_seq < old.seq;
    END;
    CREATE VIEW stream_heads (id, name, owner, last_seq, last_ms) AS
    SELECT id, name, owner,
        coalesce((SELECT seq FROM events e WHERE e.stream_id = streams.id
                  AND e.seq > streams.last_seq ORDER BY e.seq DESC LIMIT 1), last_seq),
        coalesce((SELECT ts FROM events e WHERE e.stream_id = streams.id
                  AND e.seq > streams.last_seq ORDER BY e.seq DESC LIMIT 1), last_ms)
    FROM streams;
"#,
];

/// Brings the schema of the database `conn` is open on up to date, one migration per
/// transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        // The version is read inside the write transaction: a second process migrating
        // at the same time waits for the lock and then sees the first one's work.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > MIGRATIONS.len() {
            return Err(StoreError::TooNew { version });
        }
        let Some(sql) = MIGRATIONS.get(version) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version={}", version + 1))?;
        tx.commit()?;
    }
}

/// Builds an appended event as the APIs see it: a streams-API element carries its own id
/// and position (which are stored as columns only).
pub(super) fn render(payload: &Payload, seq: u64, ts: u64) -> Event {
    // Time-ordered ids keep the id index appending at its end.
    let id = Uuid::now_v7();
    let (name, data) = match payload {
        Payload::Element { name, fields } => {
            (Some(name.as_str().into()), element(&id, seq, ts, fields))
        }
        Payload::Data(data) => (None, data.clone()),
    };
    Event {
        seq,
        ts,
        id,
        name,
        data: data.into_boxed_str(),
    }
}

/// The streams-API element of a named event: its metadata, then its members.
pub(super) fn element(id: &Uuid, seq: u64, ts: u64, members: &str) -> String {
    let mut data = String::with_capacity(members.len() + 96);
    data.push_str("{\"eventId\":\"");
    data.push_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
    data.push_str("\",\"sequence\":");
    data.push_str(&seq.to_string());
    data.push_str(",\"timestamp\":");
    data.push_str(&ts.to_string());
    data.push_str(members);
    data.push('}');
    data
}

/// The element of a named event as stored in `data`: its members from schema 4 on, the
/// whole element (a JSON object) before.
pub(super) fn stored_element(id: &Uuid, seq: u64, ts: u64, data: String) -> String {
    match data.starts_with('{') {
        true => data,
        false => element(id, seq, ts, &data),
    }
}

#[cfg(test)]
mod tests;
