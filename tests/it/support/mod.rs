//! Test support: start a server in process on a temporary database ([`TestServer`]) or
//! the real binary as a child process ([`Proc`]), speak raw HTTP/1.1 to it, build the
//! requests of both APIs, drive a headless [`Chromium`], and wait on conditions with
//! deadlines (never fixed sleeps).
//!
//! With `EVENTSERVER_TEST_NODES=postgres` (in a build with the `postgres` feature), a
//! [`TestServer`] is two nodes in process on a fresh database of one PostgreSQL cluster
//! shared by the test process, and its requests alternate between them: the contract tests
//! of both APIs then check that every contract holds whichever node each request reaches.

mod api;
mod chromium;
mod http;
#[cfg(feature = "postgres")]
mod postgres;
mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use eventserver::{Config, Server, ServerHandle};

pub use api::*;
pub use chromium::*;
pub use http::*;
#[cfg(feature = "postgres")]
pub use postgres::*;
pub use process::*;

/// User every test server has.
pub const USER: &str = "tester";
/// [`USER`]'s password.
pub const PASSWORD: &str = "correct horse";

/// The variable that selects [`Nodes`], and the one value it takes.
const NODES_VARIABLE: &str = "EVENTSERVER_TEST_NODES";
const TWO_ON_POSTGRES: &str = "postgres";

/// What a [`TestServer`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nodes {
    /// One server on a SQLite file: the default.
    OneOnSqlite,
    /// Two servers on one PostgreSQL database (`EVENTSERVER_TEST_NODES=postgres`).
    TwoOnPostgres,
}

impl Nodes {
    /// The mode this test process runs in. Any other value of the variable, or `postgres`
    /// in a build without the feature, fails the test: a run meant for two nodes must not
    /// pass on one.
    pub fn selected() -> Nodes {
        static SELECTED: OnceLock<Result<Nodes, String>> = OnceLock::new();
        let selected = SELECTED.get_or_init(|| match std::env::var(NODES_VARIABLE) {
            Err(std::env::VarError::NotPresent) => Ok(Nodes::OneOnSqlite),
            Ok(value) if value == TWO_ON_POSTGRES && cfg!(feature = "postgres") => {
                Ok(Nodes::TwoOnPostgres)
            }
            Ok(value) if value == TWO_ON_POSTGRES => Err(format!(
                "{NODES_VARIABLE}=postgres needs a build with the PostgreSQL store: cargo test \
                 --features postgres"
            )),
            other => Err(format!(
                "{NODES_VARIABLE}={other:?}: the only value is {TWO_ON_POSTGRES:?}"
            )),
        });
        selected.clone().unwrap_or_else(|why| panic!("{why}"))
    }
}

/// A running server on a temporary database: one, or two nodes (see [`Nodes`]).
pub struct TestServer {
    /// The running server (node 1); `None` only while it restarts.
    pub handle: Option<ServerHandle>,
    /// Where it (node 1) listens.
    pub addr: SocketAddr,
    /// Its database: the file in the temporary directory, or a PostgreSQL URL.
    pub db: PathBuf,
    /// The other nodes on the same database.
    others: Vec<ServerHandle>,
    /// Requests so far, to spread them over the nodes in turn.
    turns: AtomicUsize,
    /// What holds the database, dropped after the nodes have shut down.
    _storage: Storage,
}

/// What holds a [`TestServer`]'s database: a temporary directory, and on two nodes a
/// PostgreSQL database of its own (none when the test owns the database).
struct Storage {
    #[cfg(feature = "postgres")]
    database: Option<Database>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with default settings.
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    /// Starts a server after `adjust` has changed the config (every node's, on two).
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("events.db");
        match Nodes::selected() {
            Nodes::OneOnSqlite => TestServer::on(file, 1, storage(dir), adjust),
            #[cfg(feature = "postgres")]
            Nodes::TwoOnPostgres => {
                let thread = std::thread::current();
                let test = thread.name().unwrap_or("a two-node test server");
                let two = TestServer::two_nodes_with(test, adjust);
                two.expect("two nodes need PostgreSQL")
            }
            #[cfg(not(feature = "postgres"))]
            Nodes::TwoOnPostgres => unreachable!("selected only with the feature"),
        }
    }

    /// Two nodes on a fresh database of the shared PostgreSQL cluster, whatever
    /// [`Nodes::selected`] says; `None` as for [`Postgres::shared_or_skip`].
    #[cfg(feature = "postgres")]
    pub fn two_nodes_or_skip(test: &str) -> Option<TestServer> {
        TestServer::two_nodes_with(test, |_| {})
    }

    /// Like [`TestServer::two_nodes_or_skip`], after `adjust` has changed the config.
    #[cfg(feature = "postgres")]
    fn two_nodes_with(test: &str, adjust: impl FnOnce(&mut Config)) -> Option<TestServer> {
        let database = Database::fresh_or_skip(test)?;
        let url = PathBuf::from(database.url());
        let storage = Storage {
            database: Some(database),
            _dir: tempfile::tempdir().expect("temp dir"),
        };
        Some(TestServer::on(url, 2, storage, adjust))
    }

    /// Two nodes on the PostgreSQL database at `url`, which the caller owns.
    #[cfg(feature = "postgres")]
    pub fn two_nodes_on(url: &str) -> TestServer {
        let storage = storage(tempfile::tempdir().expect("temp dir"));
        TestServer::on(PathBuf::from(url), 2, storage, |_| {})
    }

    /// `nodes` servers on `db`, which gets the test user.
    fn on(
        db: PathBuf,
        nodes: usize,
        storage: Storage,
        adjust: impl FnOnce(&mut Config),
    ) -> TestServer {
        eventserver::admin::add_user(&db, USER, PASSWORD).expect("add user");
        let (handle, others) = launch(&db, nodes, adjust);
        TestServer {
            addr: handle.addr(),
            handle: Some(handle),
            db,
            others,
            turns: AtomicUsize::new(0),
            _storage: storage,
        }
    }

    /// Shuts the server down gracefully and starts a new one on the same database.
    pub fn restart(&mut self) {
        self.restart_with(|_| {});
    }

    /// Like [`TestServer::restart`], with config changes.
    pub fn restart_with(&mut self, adjust: impl FnOnce(&mut Config)) {
        let nodes = 1 + self.others.len();
        self.shutdown_all();
        let (handle, others) = launch(&self.db, nodes, adjust);
        self.addr = handle.addr();
        self.handle = Some(handle);
        self.others = others;
    }

    /// The running server (node 1), for what tests read in process (publishing).
    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("server is running")
    }

    /// Long-polls parked on every running node.
    pub fn parked(&self) -> usize {
        self.handle
            .iter()
            .chain(&self.others)
            .map(ServerHandle::parked)
            .sum()
    }

    /// Runs `sql` on the database behind the server's back, whichever the engine.
    pub fn execute_sql(&self, sql: &str) {
        #[cfg(feature = "postgres")]
        if let Some(database) = &self._storage.database {
            database.psql(sql);
            return;
        }
        let conn = rusqlite::Connection::open(&self.db).expect("open the database");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch(sql).expect("run the SQL");
    }

    /// Every node's address, node 1's first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let others = self.others.iter().map(ServerHandle::addr);
        std::iter::once(self.addr).chain(others).collect()
    }

    /// The address the next request goes to: the nodes in turn.
    pub fn next_addr(&self) -> SocketAddr {
        let turn = self.turns.fetch_add(1, Ordering::Relaxed);
        match turn % (1 + self.others.len()) {
            0 => self.addr,
            other => self.others[other - 1].addr(),
        }
    }

    /// A request with valid credentials, to the next node in turn.
    pub fn req(&self, method: &str, path: &str) -> Req {
        Req::new(self.next_addr(), method, path).auth(USER, PASSWORD)
    }

    /// A request without credentials, to the next node in turn.
    pub fn anon(&self, method: &str, path: &str) -> Req {
        Req::new(self.next_addr(), method, path)
    }

    fn shutdown_all(&mut self) {
        for handle in self.handle.take().into_iter().chain(self.others.drain(..)) {
            handle.shutdown();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown_all();
    }
}

/// A storage of nothing but a temporary directory.
fn storage(dir: tempfile::TempDir) -> Storage {
    Storage {
        #[cfg(feature = "postgres")]
        database: None,
        _dir: dir,
    }
}

/// Starts `nodes` servers on `db`: node 1 and the others.
fn launch(
    db: &std::path::Path,
    nodes: usize,
    adjust: impl FnOnce(&mut Config),
) -> (ServerHandle, Vec<ServerHandle>) {
    let mut config = Config::new(db);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.workers = 4;
    adjust(&mut config);
    let start = || Server::start(config.clone()).expect("server starts");
    let first = start();
    (first, (1..nodes).map(|_| start()).collect())
}

/// Waits until `cond` holds, failing the test after `within`.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Tests that load the machine (hundreds of connections, floods, kill loops, child
/// processes under limits) take turns across all modules, so one does not skew another's
/// timing.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}
