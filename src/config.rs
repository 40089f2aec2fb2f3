//! Server settings with their defaults and validation. Each limit says why it is that.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How hard the writer pushes each commit to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// `synchronous=FULL`: a 200 means the event survives power loss.
    Full,
    /// `synchronous=NORMAL`: may lose the last moments on power loss, never corrupts.
    Normal,
}

/// Everything the server needs to run. Build it with [`Config::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind when no listener is handed in.
    pub listen: SocketAddr,
    /// The SQLite database file.
    pub db: PathBuf,
    /// Worker threads serving requests (default: 2 × cores).
    pub workers: usize,
    /// Requests waiting for a worker, per queue (writes, reads), before new ones get 503
    /// (default 16,384): large enough that every parked long-poll can come back at once
    /// after a publish (a few MiB at most), bounded so an overload answers quickly instead
    /// of queueing without limit.
    pub queue: usize,
    /// A connection that sends nothing for this long is cut (default 120 s): idle
    /// keep-alive connections, stalled bodies and slow-drip headers free their thread. A
    /// parked long-poll's connection sends nothing either; when the poll outlasts this, the
    /// connection is closed right after its answer (the client reconnects). The default
    /// outlasts the longest long-poll (110 s) so that never happens.
    pub read_timeout: Duration,
    /// Largest request body accepted (default 1 MiB); larger ones get 413.
    pub max_body: usize,
    /// Largest `limit` a streams-API consumer may ask for (default 1000).
    pub max_limit: usize,
    /// Durability of each commit.
    pub sync: SyncMode,
    /// Longest long-poll `timeout` in seconds (default 110, golongpoll's own default).
    pub longpoll_max_timeout: u64,
    /// Most events in one long-poll answer (default 250); clients page for the rest.
    pub longpoll_max_batch: usize,
    /// Most parked long-polls at once; beyond it new ones get 503. Default: derived from the
    /// open-files limit, since tiny_http spends two descriptors per connection.
    pub max_parked: usize,
    /// Open connections beyond which new requests get 503 at once. Default: room for every
    /// parked long-poll plus 1,000 others, within the open-files limit. Changing
    /// `max_parked` does not move it: use [`connections_for`] for the matching value.
    pub max_connections: usize,
    /// Path of the golongpoll subscribe handler.
    pub events_path: String,
    /// Path of the golongpoll publish handler.
    pub publish_path: String,
    /// Most jobs queued for the writer; beyond it writes get 503 instead of unbounded memory.
    pub write_queue: usize,
    /// How long a verified credential is trusted without checking its hash again. Users
    /// removed while the server runs lose access within this time.
    pub auth_cache_ttl: Duration,
    /// Keep at most this many events per stream (default: keep everything).
    pub retain_events: Option<u64>,
    /// Keep events younger than this per stream (default: keep everything).
    pub retain_age: Option<Duration>,
    /// Failed logins per minute from one client before it gets 429 (default 10; 0: never).
    pub auth_failure_limit: u32,
    /// Whether loopback clients are throttled too (default no: tests and local tools
    /// share 127.0.0.1; behind a local reverse proxy every client looks like loopback).
    pub auth_throttle_loopback: bool,
    /// Whether `GET /metrics` needs Basic auth (default yes).
    pub metrics_auth: bool,
    /// Categories whose long-poll subscribe needs no auth (patterns, `*` matches anything).
    pub public_subscribe: Vec<String>,
    /// Categories whose `/publish` needs no auth (patterns, `*` matches anything).
    pub public_publish: Vec<String>,
    /// Test hook: `GET /.eventserver-panic` makes its handler panic (default off).
    #[doc(hidden)]
    pub panic_route: bool,
}

impl Config {
    /// Defaults for everything, with the database at `db`.
    pub fn new(db: impl Into<PathBuf>) -> Config {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let workers = 2 * cores;
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            db: db.into(),
            workers,
            queue: 16_384,
            read_timeout: Duration::from_secs(120),
            max_body: 1 << 20,
            max_limit: 1000,
            sync: SyncMode::Full,
            longpoll_max_timeout: 110,
            longpoll_max_batch: 250,
            max_parked: default_max_parked(),
            max_connections: connections_for(default_max_parked()),
            events_path: "/events".into(),
            publish_path: "/publish".into(),
            write_queue: 16_384,
            auth_cache_ttl: Duration::from_secs(30),
            retain_events: None,
            retain_age: None,
            auth_failure_limit: 10,
            auth_throttle_loopback: false,
            metrics_auth: true,
            public_subscribe: Vec::new(),
            public_publish: Vec::new(),
            panic_route: false,
        }
    }

    /// Checks every setting, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("workers", self.workers),
            ("queue", self.queue),
            ("max-body", self.max_body),
            ("max-limit", self.max_limit),
            ("longpoll-max-batch", self.longpoll_max_batch),
            ("max-parked", self.max_parked),
            ("max-connections", self.max_connections),
            ("write-queue", self.write_queue),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        if self.workers > 1024 {
            return Err("--workers must be at most 1024".into());
        }
        if self.read_timeout < Duration::from_secs(1)
            || self.read_timeout > Duration::from_secs(3600)
        {
            return Err("--read-timeout must be 1-3600 seconds".into());
        }
        if self.longpoll_max_timeout == 0 || self.longpoll_max_timeout > 86_400 {
            return Err("--longpoll-max-timeout must be 1-86400 seconds".into());
        }
        for (name, path) in [
            ("events-path", &self.events_path),
            ("publish-path", &self.publish_path),
        ] {
            if !path.starts_with('/') || path.contains('?') || path.starts_with("/api/") {
                return Err(format!(
                    "--{name} must start with '/', hold no '?', and lie outside /api/"
                ));
            }
        }
        if self.retain_events == Some(0) {
            return Err(
                "--retain-events must be at least 1 (leave it unset to keep everything)".into(),
            );
        }
        if self.retain_age.is_some_and(|a| a.is_zero()) {
            return Err(
                "--retain-secs must be at least 1 (leave it unset to keep everything)".into(),
            );
        }
        if self.events_path == self.publish_path {
            return Err("--events-path and --publish-path must differ".into());
        }
        Ok(())
    }
}

/// Connections allowed by default with `max_parked` parked polls: every parked poll plus
/// 1,000 others, but never past what the open-files limit leaves (two descriptors per
/// connection, 256 for everything else).
pub fn connections_for(max_parked: usize) -> usize {
    let limit = crate::sys::open_files_limit().unwrap_or(1024);
    let fits = (limit.saturating_sub(256) / 2) as usize;
    (max_parked + 1_000).min(fits).max(16)
}

/// Parked long-polls allowed by default: well below the open-files limit, which tiny_http
/// spends at two descriptors per connection, leaving room for the database, the listener and
/// ordinary traffic.
fn default_max_parked() -> usize {
    let limit = crate::sys::open_files_limit().unwrap_or(1024);
    let derived = (limit.saturating_sub(256) / 2).saturating_sub(256).max(16);
    // Past 10,000 the memory of parked connections (~20 KiB each) matters more than the
    // descriptors: raise --max-parked deliberately if the host has the memory.
    derived.min(10_000) as usize
}
