//! The user commands on PostgreSQL: the statements of `store::admin` on the same `users`
//! table, so `user add/list/remove` answer as they do on SQLite. The password arrives
//! already hashed (`auth::hash_password`), as on SQLite.

use super::{Database, PgError};
use crate::clock::wall_ms;
use crate::store::admin::Added;

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
}
