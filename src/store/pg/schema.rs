//! The PostgreSQL schema: an append-only list of migrations keyed by the one row of
//! `eventserver_schema`, run once however many nodes start together.
//!
//! # The tables, for several nodes
//!
//! - `streams`: one row per stream, the lock every append takes. It holds the producer
//!   that owns the stream (the producer lock, 423 for anyone else), the last sequence
//!   number and the last timestamp. A batch appending to a stream locks its row until it
//!   commits ([`super::append`]), so appends through any node are totally ordered and their
//!   sequence numbers gapless, and each is stamped no earlier than the last: timestamps
//!   never decrease along a stream even when the nodes' clocks disagree. A new stream is an
//!   `INSERT … ON CONFLICT DO NOTHING`: of two nodes creating it, the second waits for the
//!   first's commit and then finds its owner, so the race has exactly one winner.
//! - `events`: keyed by `(stream_id, seq)`, which is also the order reads follow; `id` is
//!   the UUID clients acknowledge; `name` the streams-API event name, with an index for
//!   reads by name; `data` is stored as text, exactly as it is served.
//! - `offsets`: consumer offsets per stream, consumer and event name; an ACK only moves one
//!   forward (`GREATEST`), whichever node it reaches.
//! - `users`: names, password hashes and grants, read by every node.
//! - `retention_held`, `heartbeat`: what retention held back at its last run, and one row
//!   per node for `/healthz`'s write check.
//!
//! Timestamps and sequence numbers are `BIGINT`, as SQLite's are 64-bit integers.

use postgres::{Client, GenericClient};

use super::PgError;

/// The schema, one migration per entry; entry `i` moves the version from `i` to `i + 1`.
/// Never edit an entry that has shipped: append a new one.
pub const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        hash TEXT NOT NULL,
        produce TEXT NOT NULL DEFAULT '*',
        consume TEXT NOT NULL DEFAULT '*',
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE streams (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        owner TEXT,
        last_seq BIGINT NOT NULL DEFAULT 0,
        last_ms BIGINT NOT NULL DEFAULT 0,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE events (
        stream_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        id UUID NOT NULL,
        name TEXT,
        ts BIGINT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (stream_id, seq)
    );
    CREATE UNIQUE INDEX events_by_id ON events (id);
    CREATE INDEX events_by_name ON events (stream_id, name, seq) WHERE name IS NOT NULL;
    CREATE TABLE offsets (
        stream_id BIGINT NOT NULL,
        consumer TEXT NOT NULL,
        name TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (stream_id, consumer, name)
    );
    CREATE TABLE retention_held (
        stream_id BIGINT NOT NULL,
        consumer TEXT NOT NULL,
        events BIGINT NOT NULL,
        PRIMARY KEY (stream_id, consumer)
    );
    CREATE TABLE heartbeat (
        node TEXT PRIMARY KEY,
        at_ms BIGINT NOT NULL
    );
"#];

/// The transaction advisory lock that migrations run under: "eventsrv" in ASCII, a key
/// no other program is likely to take.
const MIGRATION_LOCK: i64 = 0x6576_656e_7473_7276;

/// Brings the schema up to date, or refuses a database migrated by a newer eventserver
/// ([`PgError::TooNew`]), leaving it untouched. Returns the schema version.
///
/// Everything runs in one transaction behind [`MIGRATION_LOCK`]: nodes starting together
/// queue on the lock, and each after the first finds the schema the first one committed.
/// A failed migration leaves nothing behind (PostgreSQL's DDL is transactional).
pub fn migrate(client: &mut Client) -> Result<usize, PgError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    // A single row, enforced: the primary key admits only `true`.
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS eventserver_schema (
             one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
             version INTEGER NOT NULL
         );
         INSERT INTO eventserver_schema (version) VALUES (0) ON CONFLICT (one) DO NOTHING;",
    )?;
    let version = version(&mut tx)?;
    if version > MIGRATIONS.len() {
        return Err(PgError::TooNew { version });
    }
    for sql in &MIGRATIONS[version..] {
        tx.batch_execute(sql)?;
    }
    let known = i32::try_from(MIGRATIONS.len()).expect("fewer than 2^31 migrations");
    tx.execute("UPDATE eventserver_schema SET version = $1", &[&known])?;
    tx.commit()?;
    Ok(MIGRATIONS.len())
}

/// The schema version recorded in the database (through a client or a transaction).
pub fn version(client: &mut impl GenericClient) -> Result<usize, PgError> {
    let version: i32 = client
        .query_one("SELECT version FROM eventserver_schema", &[])?
        .get(0);
    // A negative version is none this code wrote: newer than anything it knows.
    Ok(usize::try_from(version).unwrap_or(usize::MAX))
}
