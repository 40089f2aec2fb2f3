//! Operator commands on the database file. Each opens its own connection and is safe while
//! the server runs: SQLite's locking orders it with the writer.

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

/// Adds `user` with the given password hash, or replaces the hash of an existing user.
pub fn put_user(db: &Path, user: &str, hash: &str) -> Result<Added, StoreError> {
    let conn = super::open_write(db, SyncMode::Full)?;
    let replaced = conn.execute(
        "UPDATE users SET hash = ?2 WHERE name = ?1",
        params![user, hash],
    )?;
    if replaced > 0 {
        return Ok(Added::Replaced);
    }
    conn.execute(
        "INSERT INTO users (name, hash, created_ms) VALUES (?1, ?2, ?3)",
        params![user, hash, wall_ms() as i64],
    )?;
    Ok(Added::Created)
}

/// All user names, sorted.
pub fn list_users(db: &Path) -> Result<Vec<String>, StoreError> {
    let conn = super::open_write(db, SyncMode::Full)?;
    let mut stmt = conn.prepare("SELECT name FROM users ORDER BY name")?;
    let names = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(names)
}

/// Removes `user`; false if there was no such user.
pub fn remove_user(db: &Path, user: &str) -> Result<bool, StoreError> {
    let conn = super::open_write(db, SyncMode::Full)?;
    Ok(conn.execute("DELETE FROM users WHERE name = ?1", [user])? > 0)
}

/// Whether any user exists.
pub fn has_users(db: &Path) -> Result<bool, StoreError> {
    let conn = super::open_write(db, SyncMode::Full)?;
    Ok(conn.query_row("SELECT EXISTS (SELECT 1 FROM users)", [], |r| r.get(0))?)
}
