//! The durable log on PostgreSQL (cargo feature `postgres`): the only module that names the
//! `postgres` crate, so that several eventserver nodes can share one database.
//!
//! What is here: a node's connection ([`Database`]: connecting, migrating, appending,
//! acknowledging, reading), the schema and its migrations (`schema`), the append path with
//! group commit (`append`), ACKs (`ack`), and the reads of SQLite's `Reader` with its
//! answers and types (`read`; the status page's and metrics' in `status`), retention
//! (`retention`), the cross-node wake-up (`listen`), and the operator commands (`admin`).
//! The server runs on it through `node` (the writer's [`Writes`] and the workers'
//! [`Connection`]). The module is public (`eventserver::pg`, with the feature) so that its
//! contracts are tested against a real PostgreSQL from outside, as a node would meet them.
//!
//! # One boundary, two implementations
//!
//! The rest of the server meets the store at a few names, and each gets a PostgreSQL twin
//! behind the same name, chosen once at start by [`crate::Engine`]:
//!
//! - **The writer** (`store::writer`): one thread per node takes whatever jobs are queued,
//!   commits them in one transaction and hands the outcomes to the commit hook. Its loop
//!   (batching, stop, retention between batches) does not depend on the engine; only its
//!   `writer::Log` does, here [`Writes`]: [`Database::write`] applies a batch's appends
//!   (what [`Database::append`] does), ACKs ([`Database::ack`]) and heartbeat in one
//!   transaction.
//! - **Readers** (`store::Reader`, holding a [`Connection`]): one connection per worker, as with SQLite; PostgreSQL's
//!   snapshots give each read the same consistency WAL readers give. [`Database::since`],
//!   [`Database::consume`], [`Database::seq_of`] and [`Database::user`] are its queries,
//!   returning its types (`read`); [`Database::overview`], [`Database::consumer_lag`] and
//!   [`Database::retention_held`] are the status page's and metrics' (`status`), and
//!   [`Database::newest_timestamp`] is where a node's clock starts.
//! - **Admin commands** (`store::admin`): the same statements on the same tables.
//! - **Wake-ups**: on SQLite the writer's commit hook wakes the polls its commit answers;
//!   here an append may be committed through any node, so every append transaction also
//!   announces each stream it appended to with its newest sequence number (NOTIFY), and
//!   each node's wake-up thread hears every node's through a [`Listener`] (`listen`).
//! - **Retention and checkpoints**: retention deletes in bounded chunks like SQLite's
//!   ([`Sweep`], one [`Database::retain`] per chunk, between the writer's batches), each
//!   chunk under the transaction advisory lock [`RETENTION_LOCK`] taken with
//!   `pg_try_advisory_xact_lock`, so one node at a time deletes and a node that finds it
//!   taken skips its run (`retention`); PostgreSQL checkpoints itself, so that thread does
//!   not exist there.
//!
//! What differs is what several nodes add: a node's writer is not the only one, so nothing a
//! transaction relies on may be cached across transactions without a lock (the SQLite writer
//! caches stream rows; here every batch locks the rows it appends to), and a committed
//! append must wake polls parked on other nodes (LISTEN/NOTIFY, `listen`; `api::catch_up`
//! reads what they announce).
//!
//! # What this relies on about PostgreSQL
//!
//! - **Row locks serialize appends to one stream across nodes**: a batch locks each stream
//!   row it appends to (`SELECT … FOR NO KEY UPDATE`) and holds the lock until it commits,
//!   so the next batch reads the sequence number and timestamp this one left.
//!   `two_nodes_appending_to_one_stream_get_gapless_ordered_sequences` (in
//!   `tests/it/pg.rs`, like every test named here) checks it.
//! - **A lock is let go only once its commit is visible**, so a reader that sees a
//!   stream's event `n` sees every event before it: the visible part of a stream is
//!   gapless. The same test reads the streams while two nodes write, and never sees a gap.
//! - **DDL is transactional**: all migrations run in one transaction behind a transaction
//!   advisory lock, so nodes starting together run them once and never see half of them
//!   (`migrations_run_once_when_nodes_start_together`).

mod ack;
mod admin;
mod append;
mod listen;
mod node;
mod read;
mod retention;
mod schema;
mod status;

use std::time::Duration;

use postgres::config::SslMode;
use postgres::{Client, NoTls};

pub use super::Retention;
pub use super::writer::Payload;
pub use crate::event::Event;
pub use ack::Ack;
pub use append::{Append, Outcome};
pub use listen::Listener;
pub use node::{Connection, Writes};
pub use retention::{RETENTION_LOCK, Sweep};

/// One node's connection to the shared database.
pub struct Database {
    client: Client,
    /// The streams this connection knows exist.
    known: append::Known,
}

impl Database {
    /// Connects to the database `url` names and brings its schema up to date, or refuses
    /// one a newer eventserver migrated ([`PgError::TooNew`]). Any number of nodes may open
    /// one database at once: the migrations run once.
    pub fn open(url: &str) -> Result<Database, PgError> {
        let mut client = connect(url)?;
        schema::migrate(&mut client)?;
        Ok(Database {
            client,
            known: append::Known::default(),
        })
    }

    /// The database's schema version: how many migrations it has had.
    pub fn schema_version(&mut self) -> Result<usize, PgError> {
        schema::version(&mut self.client)
    }

    /// Appends `batch` in one transaction stamped `ts` (epoch ms, from the node's clock; a
    /// stream whose last event is later is stamped at that instead), and returns each
    /// append's outcome in order. A failure fails the whole batch and stores nothing; a
    /// success is flushed to the server's disk.
    pub fn append(&mut self, batch: &[Append<'_>], ts: u64) -> Result<Vec<Outcome>, PgError> {
        append::commit(&mut self.client, &mut self.known, batch, ts)
    }

    /// Applies `batch` of ACKs in one transaction, and returns for each whether its event
    /// was found. An offset only moves forward, whichever node an ACK reaches.
    pub fn ack(&mut self, batch: &[Ack<'_>]) -> Result<Vec<bool>, PgError> {
        ack::commit(&mut self.client, batch)
    }

    /// One batch of a node's writer in one transaction, so one flush of PostgreSQL's WAL:
    /// what [`Database::append`] and [`Database::ack`] do, then, with `heartbeat`, the
    /// node's heartbeat row stamped `ts` (so a health check proves a commit goes through).
    pub fn write(
        &mut self,
        appends: &[Append<'_>],
        acks: &[Ack<'_>],
        heartbeat: Option<&str>,
        ts: u64,
    ) -> Result<(Vec<Outcome>, Vec<bool>), PgError> {
        append::create(&mut self.client, &mut self.known, appends, ts)?;
        let mut tx = self.client.transaction()?;
        let stored = match appends.is_empty() {
            true => Vec::new(),
            false => append::apply(&mut tx, appends, ts)?,
        };
        let found = match acks.is_empty() {
            true => Vec::new(),
            false => ack::apply(&mut tx, acks)?,
        };
        if let Some(node) = heartbeat {
            tx.execute(
                "INSERT INTO heartbeat (node, at_ms) VALUES ($1, $2) \
                 ON CONFLICT (node) DO UPDATE SET at_ms = excluded.at_ms",
                &[&node, &(ts as i64)],
            )?;
        }
        tx.commit()?;
        Ok((stored, found))
    }

    /// Whether the connection is gone (the server closed it, or it broke): every later
    /// call fails, so the caller opens a new one.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Whether the connection answers an empty query within the connect timeout.
    pub fn is_valid(&mut self) -> bool {
        self.client.is_valid(CONNECT_TIMEOUT).is_ok()
    }
}

/// A failure of the PostgreSQL store; its message is for logs and operators, never for
/// clients, and never holds the password.
#[derive(Debug)]
pub enum PgError {
    /// PostgreSQL refused or failed an operation, or could not be reached.
    Postgres(postgres::Error),
    /// `--db` is not a URL this build can connect with; the text says why.
    Url(String),
    /// Something this code relies on did not hold; the message says what.
    Invariant(&'static str),
    /// The schema is newer than this eventserver knows: a newer node migrated it.
    TooNew {
        /// The database's schema version.
        version: usize,
    },
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::Postgres(e) => f.write_str(&described(e)),
            PgError::Url(why) => f.write_str(why),
            PgError::Invariant(what) => f.write_str(what),
            PgError::TooNew { version } => write!(
                f,
                "the database has schema version {version}, newer than this eventserver \
                 knows ({})",
                schema::MIGRATIONS.len()
            ),
        }
    }
}

impl PgError {
    /// Whether the database could not be reached, or went away: a condition that passes
    /// when it comes back (503), as opposed to a refusal by a database that is there.
    pub fn is_unavailable(&self) -> bool {
        let PgError::Postgres(e) = self else {
            return false;
        };
        match e.code() {
            // No SQLSTATE: the connection failed, broke or timed out, or was closed.
            None => true,
            // Class 08 (connection exception), or 57P01–57P03: the server is shutting
            // down or starting up.
            Some(code) => {
                let code = code.code();
                code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
            }
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PgError::Postgres(e) => Some(e),
            _ => None,
        }
    }
}

impl From<postgres::Error> for PgError {
    fn from(e: postgres::Error) -> PgError {
        PgError::Postgres(e)
    }
}

/// `e` with its causes: the crate's own message names only the kind of failure ("db
/// error"), the server's message and the I/O error are its source.
fn described(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    text
}

/// How long connecting may take when the URL does not say (`connect_timeout`): a node
/// whose database is down must answer, not hang, and a write waits for at most one
/// attempt to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long sent data may stay unacknowledged by the database host's kernel, and how soon
/// an idle connection is probed, before the connection counts as broken: a host that
/// vanished from the network (no reset comes back) fails the calls waiting on it within
/// a few seconds instead of TCP's default of many minutes.
const DEAD_PEER: Duration = Duration::from_secs(3);

/// Why `url` is not a PostgreSQL URL eventserver can connect with, if it is not. The
/// reasons name options, never values, so they carry no password.
pub fn check_url(url: &str) -> Result<(), String> {
    parse(url).map(|_| ()).map_err(|e| e.to_string())
}

/// The connection settings `url` gives.
fn parse(url: &str) -> Result<postgres::Config, PgError> {
    let config: postgres::Config = url.parse().map_err(|e: postgres::Error| {
        PgError::Url(format!("the URL does not parse ({})", described(&e)))
    })?;
    if config.get_user().is_none() {
        return Err(PgError::Url("the URL names no user".into()));
    }
    if config.get_hosts().is_empty() {
        return Err(PgError::Url("the URL names no host".into()));
    }
    // TLS needs a TLS library this build does not carry yet.
    if config.get_ssl_mode() == SslMode::Require {
        return Err(PgError::Url("sslmode=require is not supported yet".into()));
    }
    Ok(config)
}

/// A connection to the database `url` names, committing with at least PostgreSQL's default
/// durability: a commit returns once it is flushed to the server's disk (and to any
/// synchronous standby), whatever the server's own default says.
fn connect(url: &str) -> Result<Client, PgError> {
    let mut config = parse(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.application_name("eventserver");
    config
        .tcp_user_timeout(DEAD_PEER)
        .keepalives_idle(DEAD_PEER)
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(2);
    let mut client = config.connect(NoTls)?;
    // `off` and `local` would answer a 200 for a commit a crash of the server (or the
    // loss of its host) could take back; stricter settings (`remote_apply`) are kept.
    let sync: String = client.query_one("SHOW synchronous_commit", &[])?.get(0);
    if matches!(sync.as_str(), "off" | "local") {
        client.batch_execute("SET synchronous_commit = on")?;
    }
    Ok(client)
}
