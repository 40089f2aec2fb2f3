//! Server settings with their defaults. Each limit says why it is that; the rule each must
//! keep, and its flag and variable, are its row in [`crate::settings::SETTINGS`].

use std::net::{IpAddr, SocketAddr};
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
///
/// # The process around the server
///
/// Two things a `Config` cannot set, because they must be in force before the process
/// starts its first thread: tiny_http runs every connection on a thread with Rust's default
/// stack (2 MiB of address space each, 20 GB for 10,000 parked long-polls), and glibc gives
/// each busy thread a 64 MiB malloc arena. Start a process that serves many connections
/// with `RUST_MIN_STACK=65536` and `MALLOC_ARENA_MAX=2` in its environment, or call
/// [`crate::service::use_small_thread_stacks`] first thing in `main`, as the binary does
/// (the server's own threads set their stacks, so only tiny_http's use the default). Call
/// [`crate::service::raise_open_files_limit`] before `Config::new`: the defaults of
/// `max_parked` and `max_connections` follow the open-files limit.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind when no listener is handed in.
    pub listen: SocketAddr,
    /// The SQLite database file, or a PostgreSQL URL (`postgres://USER:PASS@HOST:PORT/DB`,
    /// see [`Engine`]). Show it with [`Config::db_shown`], which leaves the password out.
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
    /// How long a stream of events (Server-Sent Events) stays open (default 300 s) before it
    /// closes and its client reconnects with `Last-Event-ID`: bounded, so that a stream
    /// cannot hold its connection and its parked place forever, and a long-lived client
    /// goes through authentication again now and then.
    pub sse_lifetime: Duration,
    /// How often an idle stream of events sends a comment line (default 15 s): proxies and
    /// load balancers close connections idle for a minute or so.
    pub sse_heartbeat: Duration,
    /// Most parked long-polls at once; beyond it new ones get 503. Default: derived from the
    /// open-files limit, since tiny_http spends two descriptors per connection.
    pub max_parked: usize,
    /// Open connections beyond which new requests get 503 at once. Default: room for every
    /// parked long-poll plus 1,000 others, within the open-files limit. Changing
    /// `max_parked` does not move it: use [`Config::connections_for`] for the matching value.
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
    /// Whether retention deletes only events that every consumer known on their stream
    /// (one that has acknowledged there) has acknowledged (default no).
    pub retain_acked_only: bool,
    /// Failed logins per minute of one user from one client address, and user names tried
    /// from one address, before 429 (default 10; 0: never). Counting per user keeps one
    /// user's stale password from locking out everyone behind the same NAT.
    pub auth_failure_limit: u32,
    /// Whether loopback clients are throttled too (default no: tests and local tools
    /// share 127.0.0.1; behind a local reverse proxy, list it in `trusted_proxies`).
    pub auth_throttle_loopback: bool,
    /// Whether `GET /metrics` needs Basic auth (default yes).
    pub metrics_auth: bool,
    /// Categories whose long-poll subscribe needs no auth (patterns, `*` matches anything).
    pub public_subscribe: Vec<String>,
    /// Categories whose `/publish` needs no auth (patterns, `*` matches anything).
    pub public_publish: Vec<String>,
    /// Origins (`https://app.example`) whose pages' scripts may call the APIs, with their
    /// users' credentials; `*` lets any page call them without credentials (default none:
    /// browsers keep the same-origin policy).
    pub cors_origins: Vec<String>,
    /// Peers whose `X-Forwarded-For` is believed: the reverse proxies in front (default
    /// none, so a client cannot choose the address it is throttled and logged under).
    pub trusted_proxies: Vec<Cidr>,
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
            sse_lifetime: Duration::from_secs(300),
            sse_heartbeat: Duration::from_secs(15),
            longpoll_max_batch: 250,
            max_parked: default_max_parked(),
            max_connections: Config::connections_for(default_max_parked()),
            events_path: "/events".into(),
            publish_path: "/publish".into(),
            write_queue: 16_384,
            auth_cache_ttl: Duration::from_secs(30),
            retain_events: None,
            retain_age: None,
            retain_acked_only: false,
            auth_failure_limit: 10,
            auth_throttle_loopback: false,
            metrics_auth: true,
            public_subscribe: Vec::new(),
            public_publish: Vec::new(),
            cors_origins: Vec::new(),
            trusted_proxies: Vec::new(),
        }
    }

    /// Checks every setting against its rule in [`crate::settings::SETTINGS`], naming the
    /// first that is wrong by its flag.
    pub fn validate(&self) -> Result<(), crate::settings::Invalid> {
        crate::settings::check(self)
    }

    /// The engine [`Config::db`] names.
    pub fn engine(&self) -> Engine {
        Engine::of(&self.db)
    }

    /// [`Config::db`] as logs and messages show it: a PostgreSQL URL without its password.
    pub fn db_shown(&self) -> String {
        let text = self.db.to_string_lossy();
        match self.engine() {
            Engine::Sqlite => text.into_owned(),
            Engine::Postgres => without_password(&text),
        }
    }

    /// The connection cap that suits `max_parked` parked polls (the default of
    /// [`Config::max_connections`] for the default `max_parked`): every parked poll plus
    /// 1,000 others, but never past what the open-files limit leaves (two descriptors per
    /// connection, 256 for everything else).
    pub fn connections_for(max_parked: usize) -> usize {
        (max_parked + 1_000).min(connections_that_fit()).max(16)
    }
}

/// The database engine a `--db` value names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A SQLite file: any value that is not a PostgreSQL URL.
    Sqlite,
    /// A PostgreSQL database: a `postgres://` or `postgresql://` URL (scheme in any case).
    Postgres,
}

impl Engine {
    /// The engine `db` names.
    pub fn of(db: &std::path::Path) -> Engine {
        let text = db.to_string_lossy();
        let scheme = text.split_once("://").map_or("", |(scheme, _)| scheme);
        match ["postgres", "postgresql"]
            .iter()
            .any(|s| scheme.eq_ignore_ascii_case(s))
        {
            true => Engine::Postgres,
            false => Engine::Sqlite,
        }
    }
}

/// `url` with the password of its user part (`user:PASS@`) and any `password=` parameter
/// replaced by `***`, so that logs and error messages never carry it.
fn without_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    // The user part ends at the last '@': a password may hold an unescaped '@' or '/'
    // (a database name with an '@' loses more than its password, which is no leak).
    let rest = match before_query.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => before_query.to_owned(),
    };
    let query = query.map(|query| {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => param.to_owned(),
            })
            .collect();
        format!("?{}", params.join("&"))
    });
    format!("{scheme}://{rest}{}", query.unwrap_or_default())
}

/// Parked long-polls allowed by default: well below the open-files limit, which tiny_http
/// spends at two descriptors per connection, leaving room for the database, the listener and
/// ordinary traffic.
fn default_max_parked() -> usize {
    let derived = connections_that_fit().saturating_sub(256).max(16);
    // Past 10,000 the memory of parked connections (~20 KiB each) matters more than the
    // descriptors: raise --max-parked deliberately if the host has the memory.
    derived.min(10_000)
}

/// Connections the open-files limit leaves room for: tiny_http spends two descriptors on
/// each, and 256 are kept for the database, the listener and the rest.
fn connections_that_fit() -> usize {
    let limit = crate::sys::open_files_limit().unwrap_or(1024);
    (limit.saturating_sub(256) / 2) as usize
}

/// A block of addresses, `10.0.0.0/8` or `2001:db8::/32`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Whether `ip` lies in the block; an IPv4-mapped IPv6 address is taken as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (network, ip, width) = match (self.network, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n).into(), u32::from(a).into(), 32),
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
            _ => return false,
        };
        // Shifting a u128 by 128 is no shift at all: a /0 block holds everything.
        (network ^ ip)
            .checked_shr(width - u32::from(self.bits))
            .unwrap_or(0)
            == 0
    }
}

impl std::str::FromStr for Cidr {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Cidr, &'static str> {
        let (address, bits) = match text.split_once('/') {
            Some((address, bits)) => (address, Some(bits)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| "not an IP address")?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => width,
            Some(bits) => bits
                .parse()
                .ok()
                .filter(|b| *b <= width)
                .ok_or("not a prefix length")?,
        };
        Ok(Cidr { network, bits })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_selects_postgres_and_anything_else_is_a_sqlite_file() {
        for url in [
            "postgres://u:p@db.example:5432/events",
            "postgresql://u@localhost/events",
            "POSTGRES://u@h/d",
        ] {
            assert_eq!(Engine::of(url.as_ref()), Engine::Postgres, "{url}");
        }
        for path in [
            "events.db",
            "./postgres/events.db",
            "postgres:events.db",
            "/x://y",
        ] {
            assert_eq!(Engine::of(path.as_ref()), Engine::Sqlite, "{path}");
        }
    }

    #[test]
    fn the_shown_database_never_holds_the_password() {
        let shown = |db: &str| Config::new(db).db_shown();
        assert_eq!(shown("/var/lib/x.db"), "/var/lib/x.db");
        assert_eq!(
            shown("postgres://app:s3cr@t@db:5432/events"),
            "postgres://app:***@db:5432/events"
        );
        assert_eq!(
            shown("postgresql://app@db/events?password=s3cret&sslmode=disable"),
            "postgresql://app@db/events?password=***&sslmode=disable"
        );
        assert_eq!(shown("postgres://app:pw@db"), "postgres://app:***@db");
        assert_eq!(shown("postgres://app:a/b@db/e"), "postgres://app:***@db/e");
        assert_eq!(shown("postgres://db/events"), "postgres://db/events");
    }

    #[test]
    fn cidr_blocks_hold_their_addresses() {
        let holds = |block: &str, ip: &str| {
            let block: Cidr = block.parse().unwrap();
            block.contains(ip.parse().unwrap())
        };
        assert!(holds("10.0.0.0/8", "10.200.3.4"));
        assert!(!holds("10.0.0.0/8", "11.0.0.1"));
        assert!(holds("192.0.2.7", "192.0.2.7") && !holds("192.0.2.7", "192.0.2.8"));
        assert!(holds("0.0.0.0/0", "203.0.113.1") && holds("::/0", "2001:db8::1"));
        assert!(holds("2001:db8::/32", "2001:db8:ffff::1"));
        assert!(!holds("2001:db8::/32", "2001:db9::1"));
        assert!(holds("127.0.0.1", "::ffff:127.0.0.1"), "IPv4-mapped");
        assert!(!holds("127.0.0.0/8", "::1"));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "::/129", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
    }
}
