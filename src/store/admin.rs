//! Operator commands on the database file. Each opens its own connection and is safe while
//! the server runs: SQLite's locking orders it with the writer. Only adding a user creates
//! the database (it may come before the server's first start); otherwise every command
//! needs an existing one at the current schema version ([`super::open_existing`]): only the
//! server upgrades a schema, at start.

use std::path::Path;

use rusqlite::params;

use super::StoreError;
use crate::clock::wall_ms;
use crate::config::SyncMode;

/// Whether `user` was added or already existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A new user.
    Created,
    /// An existing user whose password was replaced.
    Replaced,
}

/// Adds `user` with the given password hash and stream patterns, or replaces all three
/// for an existing user.
pub fn put_user(
    db: &Path,
    user: &str,
    hash: &str,
    produce: &str,
    consume: &str,
) -> Result<Added, StoreError> {
    // Creates the database when there is none; an existing one is not migrated here.
    let conn = match db.exists() {
        true => super::open_existing(db)?,
        false => super::open_write(db, SyncMode::Full)?,
    };
    let replaced = conn.execute(
        "UPDATE users SET hash = ?2, produce = ?3, consume = ?4 WHERE name = ?1",
        params![user, hash, produce, consume],
    )?;
    if replaced > 0 {
        return Ok(Added::Replaced);
    }
    conn.execute(
        "INSERT INTO users (name, hash, created_ms, produce, consume) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user, hash, wall_ms() as i64, produce, consume],
    )?;
    Ok(Added::Created)
}

/// All users with their produce and consume patterns, sorted by name.
pub fn list_users(db: &Path) -> Result<Vec<(String, String, String)>, StoreError> {
    let conn = super::open_existing(db)?;
    let mut stmt = conn.prepare("SELECT name, produce, consume FROM users ORDER BY name")?;
    let users = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(users)
}

/// Removes `user`; false if there was no such user.
pub fn remove_user(db: &Path, user: &str) -> Result<bool, StoreError> {
    let conn = super::open_existing(db)?;
    Ok(conn.execute("DELETE FROM users WHERE name = ?1", [user])? > 0)
}

/// Whether any user exists.
pub fn has_users(db: &Path) -> Result<bool, StoreError> {
    let conn = super::open_write(db, SyncMode::Full)?;
    Ok(conn.query_row("SELECT EXISTS (SELECT 1 FROM users)", [], |r| r.get(0))?)
}

/// A stream as `stream list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// Stream name.
    pub name: String,
    /// Owning producer, if claimed.
    pub owner: Option<String>,
    /// Events stored.
    pub events: u64,
    /// Sequence number of the newest event.
    pub last_seq: u64,
    /// Time of the newest event (epoch ms; 0 if none).
    pub last_ms: u64,
}

/// A consumer's position as `stream show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerOffset {
    /// Consumer id.
    pub consumer: String,
    /// Event name the offset is for.
    pub event_name: String,
    /// Sequence number acknowledged up to.
    pub offset: u64,
    /// Events of that name after the offset.
    pub lag: u64,
}

/// Everything `stream show` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDetail {
    /// The summary line.
    pub summary: StreamSummary,
    /// Time of the oldest stored event (epoch ms; 0 if none).
    pub first_ms: u64,
    /// Consumers with offsets.
    pub consumers: Vec<ConsumerOffset>,
    /// What interest retention (`--retain-acked-only`) held back at its last run: per
    /// consumer, the events past the limits it has not acknowledged.
    pub held: Vec<(String, u64)>,
}

const SUMMARY: &str = "SELECT s.name, s.owner, \
     (SELECT count(*) FROM events e WHERE e.stream_id = s.id), s.last_seq, s.last_ms, s.id \
     FROM stream_heads s";

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<(StreamSummary, i64)> {
    Ok((
        StreamSummary {
            name: r.get(0)?,
            owner: r.get(1)?,
            events: r.get::<_, i64>(2)? as u64,
            last_seq: r.get::<_, i64>(3)? as u64,
            last_ms: r.get::<_, i64>(4)? as u64,
        },
        r.get(5)?,
    ))
}

/// The consumers of stream `?1` with their offsets and lag, by consumer and event name.
/// Each lag counts through the `(stream_id, name, seq)` index: work in proportion to it.
pub(super) const CONSUMERS: &str = "SELECT o.consumer, o.name, o.seq, (SELECT count(*) \
     FROM events e WHERE e.stream_id = o.stream_id AND e.name = o.name AND e.seq > o.seq) \
     FROM offsets o WHERE o.stream_id = ?1 ORDER BY 1, 2";

/// A row of [`CONSUMERS`].
pub(super) fn consumer_offset(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConsumerOffset> {
    Ok(ConsumerOffset {
        consumer: r.get(0)?,
        event_name: r.get(1)?,
        offset: r.get::<_, i64>(2)? as u64,
        lag: r.get::<_, i64>(3)? as u64,
    })
}

/// All streams, by name.
pub fn list_streams(db: &Path) -> Result<Vec<StreamSummary>, StoreError> {
    let conn = super::open_existing(db)?;
    let mut stmt = conn.prepare(&format!("{SUMMARY} ORDER BY s.name"))?;
    let rows = stmt
        .query_map([], summary)?
        .map(|r| r.map(|(s, _)| s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// One stream in detail; `None` if it does not exist.
pub fn show_stream(db: &Path, name: &str) -> Result<Option<StreamDetail>, StoreError> {
    let conn = super::open_existing(db)?;
    let found = conn
        .prepare(&format!("{SUMMARY} WHERE s.name = ?1"))?
        .query_row([name], summary);
    let (summary, id) = match found {
        Ok(row) => row,
        Err(rusqlite::Error::QueryReturnedNoRows) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let first_ms: i64 = conn.query_row(
        "SELECT coalesce((SELECT ts FROM events WHERE stream_id = ?1 ORDER BY seq LIMIT 1), 0)",
        [id],
        |r| r.get(0),
    )?;
    let consumers = conn
        .prepare(CONSUMERS)?
        .query_map([id], consumer_offset)?
        .collect::<Result<Vec<_>, _>>()?;
    let held = conn
        .prepare("SELECT consumer, events FROM retention_held WHERE stream_id = ?1 ORDER BY 1")?
        .query_map([id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(StreamDetail {
        summary,
        first_ms: first_ms as u64,
        consumers,
        held,
    }))
}

/// Clears a stream's producer lock; false if the stream does not exist.
pub fn release_stream(db: &Path, name: &str) -> Result<bool, StoreError> {
    let conn = super::open_existing(db)?;
    Ok(conn.execute("UPDATE streams SET owner = NULL WHERE name = ?1", [name])? > 0)
}

/// What [`reset_consumer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// The offset is set.
    Done,
    /// No stream has that name; nothing changed.
    NoStream,
    /// The offset is past the stream's newest event (this sequence number); nothing changed.
    PastNewest(u64),
}

/// Whose offset: a consumer's, for one event name of one stream.
#[derive(Debug, Clone, Copy)]
pub struct OffsetOf<'a> {
    /// Stream name.
    pub stream: &'a str,
    /// Consumer id.
    pub consumer: &'a str,
    /// The event name the offset is kept for.
    pub event_name: &'a str,
}

/// Sets a consumer's offset for one event name (forwards or back). The offset is a sequence
/// number from 0 to the stream's newest.
pub fn reset_consumer(db: &Path, of: OffsetOf<'_>, offset: u64) -> Result<Reset, StoreError> {
    let OffsetOf {
        stream,
        consumer,
        event_name,
    } = of;
    let conn = super::open_existing(db)?;
    let Some(info) = super::reader::stream_info(&conn, stream)? else {
        return Ok(Reset::NoStream);
    };
    if offset > info.last_seq {
        return Ok(Reset::PastNewest(info.last_seq));
    }
    conn.execute(
        "INSERT INTO offsets (stream_id, consumer, name, seq) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (stream_id, consumer, name) DO UPDATE SET seq = excluded.seq",
        params![info.id, consumer, event_name, offset as i64],
    )?;
    Ok(Reset::Done)
}

/// Forgets a consumer of a stream: its offsets, and what retention held back for it, so
/// the next retention run no longer keeps events for it. `None` if the stream does not
/// exist; else the number of offsets (event names) it had there, 0 if it was unknown.
pub fn remove_consumer(
    db: &Path,
    stream: &str,
    consumer: &str,
) -> Result<Option<usize>, StoreError> {
    let mut conn = super::open_existing(db)?;
    let tx = conn.transaction()?;
    let Some(info) = super::reader::stream_info(&tx, stream)? else {
        return Ok(None);
    };
    let removed = tx.execute(
        "DELETE FROM offsets WHERE stream_id = ?1 AND consumer = ?2",
        params![info.id, consumer],
    )?;
    tx.execute(
        "DELETE FROM retention_held WHERE stream_id = ?1 AND consumer = ?2",
        params![info.id, consumer],
    )?;
    tx.commit()?;
    Ok(Some(removed))
}

/// What a backup does with a file already at its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfExists {
    /// Leave it untouched and write nothing.
    Refuse,
    /// Replace it, atomically, with the copy.
    Replace,
}

/// What [`backup`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackedUp {
    /// The copy is complete at the target, synced, and its name is synced too.
    Done,
    /// A file is at the target and replacing it was not asked for; it is untouched.
    TargetExists,
}

/// Writes a consistent copy of the database to `target`, while the server may keep running;
/// `existing` says what becomes of a file already there.
///
/// The copy is written to a new file beside the target (the same directory, so that moving
/// it into place is one atomic rename), synced, moved into place, and then the directory is
/// synced, so that once this returns the copy survives a power loss under its name. The
/// target is never seen half-written: it is either what it was or the whole copy. A failure
/// removes the temporary file.
pub fn backup(db: &Path, target: &Path, existing: IfExists) -> Result<BackedUp, StoreError> {
    let conn = super::open_existing(db)?;
    // Checked first only to spare the copy's work; placing it below re-checks atomically.
    if existing == IfExists::Refuse && target.exists() {
        return Ok(BackedUp::TargetExists);
    }
    let name = target.file_name().ok_or_else(|| {
        let why = std::io::Error::new(std::io::ErrorKind::InvalidInput, "names no file");
        StoreError::File(target.to_owned(), why)
    })?;
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let temp = dir.join(temp_name);
    // Created here (and never an existing file) so that the removal below only ever
    // removes what this call made; VACUUM INTO accepts an empty file.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| StoreError::File(dir.to_owned(), e))?;
    let placed = copy_into_place(&conn, &temp, target, existing);
    // After a rename the temporary name is gone; after a link or a failure it is not.
    let removed = match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::File(temp, e)),
        _ => Ok(()),
    };
    let placed = placed?;
    if placed == BackedUp::Done {
        removed?;
        sync(dir)?;
    }
    Ok(placed)
}

/// Writes the copy into the empty file `temp`, syncs it, and gives it the name `target`:
/// renamed over whatever is there to replace it, else linked, which refuses an existing
/// name atomically (a rename would replace a file that appeared since the check above). A
/// file system without hard links therefore takes backups only with [`IfExists::Replace`].
fn copy_into_place(
    conn: &rusqlite::Connection,
    temp: &Path,
    target: &Path,
    existing: IfExists,
) -> Result<BackedUp, StoreError> {
    let temp_text = temp
        .to_str()
        .ok_or_else(|| StoreError::NotUtf8(temp.to_owned()))?;
    conn.execute("VACUUM INTO ?1", [temp_text])?;
    sync(temp)?;
    let placed = match existing {
        IfExists::Replace => std::fs::rename(temp, target),
        IfExists::Refuse => std::fs::hard_link(temp, target),
    };
    match placed {
        Ok(()) => Ok(BackedUp::Done),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(BackedUp::TargetExists),
        Err(e) => Err(StoreError::File(target.to_owned(), e)),
    }
}

/// Flushes a file, or a directory's entries, to the disk.
fn sync(path: &Path) -> Result<(), StoreError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::File(path.to_owned(), e))
}
