//! Administrative operations for the command line and embedders: users.

use std::path::Path;

use crate::error::Error;
pub use crate::store::admin::Added;

/// Adds a user (or replaces its password), storing only an argon2id hash.
pub fn add_user(db: &Path, name: &str, password: &str) -> Result<Added, Error> {
    check_user_name(name)?;
    if password.is_empty() {
        return Err(Error::Config("the password must not be empty".into()));
    }
    let hash = crate::auth::hash_password(password);
    Ok(crate::store::admin::put_user(db, name, &hash)?)
}

/// All user names, sorted.
pub fn list_users(db: &Path) -> Result<Vec<String>, Error> {
    Ok(crate::store::admin::list_users(db)?)
}

/// Removes a user; false if it did not exist.
pub fn remove_user(db: &Path, name: &str) -> Result<bool, Error> {
    Ok(crate::store::admin::remove_user(db, name)?)
}

/// Whether the database has any user.
pub fn has_users(db: &Path) -> Result<bool, Error> {
    Ok(crate::store::admin::has_users(db)?)
}

/// User names go into Basic auth, where a colon ends the name.
fn check_user_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > 255
        || name.contains(':')
        || name.chars().any(char::is_control)
    {
        return Err(Error::Config(
            "user names are 1-255 bytes without ':' or control characters".into(),
        ));
    }
    Ok(())
}
