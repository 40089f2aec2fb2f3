//! The errors of starting and running a server, joined from each layer's own.

use crate::store::StoreError;

/// Why the server could not start or an admin command failed.
#[derive(Debug)]
pub enum Error {
    /// A setting is invalid; the message names it.
    Config(String),
    /// The network or a thread could not be set up.
    Io(std::io::Error),
    /// The database could not be opened or used.
    Store(StoreError),
    /// An in-process call was refused: bad input, a locked stream, a full queue, or a
    /// server shutting down. The message says which.
    Refused(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config(m) => write!(f, "invalid setting: {m}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Store(e) => write!(f, "database: {e}"),
            Error::Refused(m) => write!(f, "refused: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Store(e)
    }
}
