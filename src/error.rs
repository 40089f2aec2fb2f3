//! The errors of starting and running a server, joined from each layer's own.

use crate::admin::Refusal;
use crate::api::Failure;
use crate::settings::Invalid;
use crate::store::StoreError;

/// Why the server could not start, an admin command failed, or an in-process call was
/// refused.
#[derive(Debug)]
pub enum Error {
    /// A setting is invalid; it names the flag or variable.
    Config(Invalid),
    /// An operator command's argument was refused; nothing changed.
    Admin(Refusal),
    /// The network or a thread could not be set up.
    Io(std::io::Error),
    /// The database could not be opened or used.
    Store(StoreError),
    /// The PostgreSQL database could not be reached or used.
    #[cfg(feature = "postgres")]
    Pg(crate::store::pg::PgError),
    /// An in-process publish or subscribe was refused, as the HTTP API would refuse it:
    /// bad input, a locked stream, a full queue, or a server shutting down.
    Refused(Failure),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config(m) => write!(f, "invalid setting: {m}"),
            Error::Admin(refusal) => write!(f, "{refusal}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Store(e) => write!(f, "database: {e}"),
            #[cfg(feature = "postgres")]
            Error::Pg(e) => write!(f, "database: {e}"),
            Error::Refused(failure) => write!(f, "refused: {failure}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(invalid) => Some(invalid),
            Error::Admin(refusal) => Some(refusal),
            Error::Io(e) => Some(e),
            Error::Store(e) => Some(e),
            #[cfg(feature = "postgres")]
            Error::Pg(e) => Some(e),
            Error::Refused(failure) => Some(failure),
        }
    }
}

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

#[cfg(feature = "postgres")]
impl From<crate::store::pg::PgError> for Error {
    fn from(e: crate::store::pg::PgError) -> Error {
        Error::Pg(e)
    }
}

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Error {
        Error::Config(invalid)
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Error {
        Error::Admin(refusal)
    }
}
