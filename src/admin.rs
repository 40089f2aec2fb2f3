//! Administrative operations for the command line and embedders: users, streams,
//! consumer offsets and backups. Each works on the database file and is safe while a
//! server runs on it.
//!
//! Given a PostgreSQL URL (cargo feature `postgres`), each runs on that database, migrating
//! it first as a node would, except the backup, which is PostgreSQL's own to take
//! ([`Refusal::UsePgDump`]).

use std::path::{Path, PathBuf};

use crate::config::Engine;
use crate::error::Error;
pub use crate::store::admin::Added;
use crate::store::admin::{BackedUp, OffsetOf, Reset};

/// Why an operator command refused its arguments; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A user needs a password.
    EmptyPassword,
    /// The user name cannot go into Basic auth.
    UserName,
    /// A grant pattern holds control characters.
    Patterns,
    /// No stream has this name.
    NoStream(String),
    /// The offset is past the stream's newest event (the sequence number given).
    PastNewest {
        /// The offset asked for.
        offset: u64,
        /// The stream's newest sequence number.
        newest: u64,
    },
    /// The backup's target exists already, and replacing it was not asked for.
    TargetExists(PathBuf),
    /// A backup of a PostgreSQL database is PostgreSQL's own to take.
    UsePgDump,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::EmptyPassword => f.write_str("the password must not be empty"),
            Refusal::UserName => {
                f.write_str("user names are 1-255 bytes without ':' or control characters")
            }
            Refusal::Patterns => f.write_str("patterns must not hold control characters"),
            Refusal::NoStream(stream) => write!(f, "no stream named '{stream}'"),
            Refusal::PastNewest { offset, newest } => write!(
                f,
                "offset {offset} is past the stream's newest event ({newest})"
            ),
            Refusal::TargetExists(path) => write!(f, "{} already exists", path.display()),
            Refusal::UsePgDump => f.write_str(
                "backup does not copy a PostgreSQL database: back it up with PostgreSQL's own \
                 tools (pg_dump, or pg_basebackup for the whole cluster); nothing was written",
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Adds a user who may produce to and consume from every stream (or replaces an existing
/// user's password and grants), storing only an argon2id hash.
pub fn add_user(db: &Path, name: &str, password: &str) -> Result<Added, Error> {
    add_user_with(db, name, password, "*", "*")
}

/// Adds a user limited to streams matching `produce` and `consume` (comma-separated
/// patterns, `*` matches any run of characters, empty grants nothing), or replaces an
/// existing user's password and grants.
pub fn add_user_with(
    db: &Path,
    name: &str,
    password: &str,
    produce: &str,
    consume: &str,
) -> Result<Added, Error> {
    check_user_name(name)?;
    if password.is_empty() {
        return Err(Refusal::EmptyPassword.into());
    }
    if [produce, consume]
        .iter()
        .any(|patterns| patterns.chars().any(char::is_control))
    {
        return Err(Refusal::Patterns.into());
    }
    let hash = crate::auth::hash_password(password);
    #[cfg(feature = "postgres")]
    if let Some(mut pg) = postgres(db)? {
        return Ok(pg.put_user(name, &hash, produce, consume)?);
    }
    Ok(crate::store::admin::put_user(
        db, name, &hash, produce, consume,
    )?)
}

/// All users as (name, produce patterns, consume patterns), sorted by name.
pub fn list_users(db: &Path) -> Result<Vec<(String, String, String)>, Error> {
    #[cfg(feature = "postgres")]
    if let Some(mut pg) = postgres(db)? {
        return Ok(pg.list_users()?);
    }
    Ok(crate::store::admin::list_users(db)?)
}

/// Removes a user; false if it did not exist.
pub fn remove_user(db: &Path, name: &str) -> Result<bool, Error> {
    #[cfg(feature = "postgres")]
    if let Some(mut pg) = postgres(db)? {
        return Ok(pg.remove_user(name)?);
    }
    Ok(crate::store::admin::remove_user(db, name)?)
}

/// Adds user `name` with `password`, allowed every stream, if the database has no user
/// yet; false if it has one. On PostgreSQL it is one statement, so of the nodes starting
/// together on a new database exactly one adds it.
pub fn add_first_user(db: &Path, name: &str, password: &str) -> Result<bool, Error> {
    check_user_name(name)?;
    let hash = crate::auth::hash_password(password);
    #[cfg(feature = "postgres")]
    if let Some(mut pg) = postgres(db)? {
        return Ok(pg.add_first_user(name, &hash)?);
    }
    if crate::store::admin::has_users(db)? {
        return Ok(false);
    }
    crate::store::admin::put_user(db, name, &hash, "*", "*")?;
    Ok(true)
}

/// The PostgreSQL database `db` names, connected and migrated; `None` for a SQLite file.
#[cfg(feature = "postgres")]
fn postgres(db: &Path) -> Result<Option<crate::store::pg::Database>, Error> {
    if Engine::of(db) == Engine::Sqlite {
        return Ok(None);
    }
    // `Engine::of` found the scheme in the text, so the path is the URL as given.
    let url = db.to_string_lossy();
    Ok(Some(crate::store::pg::Database::open(&url)?))
}

/// User names go into Basic auth, where a colon ends the name.
fn check_user_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > 255
        || name.contains(':')
        || name.chars().any(char::is_control)
    {
        return Err(Refusal::UserName.into());
    }
    Ok(())
}

pub use crate::store::admin::{ConsumerOffset, StreamDetail, StreamSummary};

/// All streams, by name.
pub fn list_streams(db: &Path) -> Result<Vec<StreamSummary>, Error> {
    #[cfg(feature = "postgres")]
    if let Some(mut pg) = postgres(db)? {
        return Ok(pg.list_streams()?);
    }
    Ok(crate::store::admin::list_streams(db)?)
}

/// One stream with its consumers; `None` if it does not exist.
pub fn show_stream(db: &Path, name: &str) -> Result<Option<StreamDetail>, Error> {
    #[cfg(feature = "postgres")]
    if let Some(mut pg) = postgres(db)? {
        return Ok(pg.show_stream(name)?);
    }
    Ok(crate::store::admin::show_stream(db, name)?)
}

/// Clears a stream's producer lock, so a replacement producer can write; false if the
/// stream does not exist.
pub fn release_stream(db: &Path, name: &str) -> Result<bool, Error> {
    #[cfg(feature = "postgres")]
    if let Some(mut pg) = postgres(db)? {
        return Ok(pg.release_stream(name)?);
    }
    Ok(crate::store::admin::release_stream(db, name)?)
}

/// Sets a consumer's offset for one event name; [`Error::Admin`] explains a refusal.
pub fn reset_consumer(
    db: &Path,
    stream: &str,
    consumer: &str,
    event_name: &str,
    offset: u64,
) -> Result<(), Error> {
    let of = OffsetOf {
        stream,
        consumer,
        event_name,
    };
    #[cfg(feature = "postgres")]
    let reset = match postgres(db)? {
        Some(mut pg) => pg.reset_consumer(of, offset)?,
        None => crate::store::admin::reset_consumer(db, of, offset)?,
    };
    #[cfg(not(feature = "postgres"))]
    let reset = crate::store::admin::reset_consumer(db, of, offset)?;
    match reset {
        Reset::Done => Ok(()),
        Reset::NoStream => Err(Refusal::NoStream(stream.to_owned()).into()),
        Reset::PastNewest(newest) => Err(Refusal::PastNewest { offset, newest }.into()),
    }
}

/// Forgets consumer `consumer` of `stream` (all its offsets there): retention with
/// `--retain-acked-only` stops keeping events for it. False if it had no offsets there;
/// [`Error::Admin`] if the stream does not exist.
pub fn remove_consumer(db: &Path, stream: &str, consumer: &str) -> Result<bool, Error> {
    #[cfg(feature = "postgres")]
    let removed = match postgres(db)? {
        Some(mut pg) => pg.remove_consumer(stream, consumer)?,
        None => crate::store::admin::remove_consumer(db, stream, consumer)?,
    };
    #[cfg(not(feature = "postgres"))]
    let removed = crate::store::admin::remove_consumer(db, stream, consumer)?;
    match removed {
        Some(offsets) => Ok(offsets > 0),
        None => Err(Refusal::NoStream(stream.to_owned()).into()),
    }
}

pub use crate::store::admin::IfExists;

/// Writes a consistent copy of the database to `target`, safe while a server runs:
/// written beside it, synced, then moved into place, so `target` never holds a partial
/// copy. A file already at `target` is refused ([`Error::Admin`], the file untouched)
/// unless `existing` is [`IfExists::Replace`]; without it, the copy is hard-linked into
/// place, so a file system without hard links takes backups only with it.
pub fn backup(db: &Path, target: &Path, existing: IfExists) -> Result<(), Error> {
    if Engine::of(db) == Engine::Postgres {
        return Err(Refusal::UsePgDump.into());
    }
    match crate::store::admin::backup(db, target, existing)? {
        BackedUp::Done => Ok(()),
        BackedUp::TargetExists => Err(Refusal::TargetExists(target.to_owned()).into()),
    }
}
