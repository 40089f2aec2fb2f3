//! Test support: start a server in process on a temporary database ([`TestServer`]) or
//! the real binary as a child process ([`Proc`]), speak raw HTTP/1.1 to it, build the
//! requests of both APIs, drive a headless [`Chromium`], and wait on conditions with
//! deadlines (never fixed sleeps).

mod api;
mod chromium;
mod http;
#[cfg(feature = "postgres")]
mod postgres;
mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
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

/// A running server on a temporary database.
pub struct TestServer {
    /// The running server; `None` only while it restarts.
    pub handle: Option<ServerHandle>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its database, in the temporary directory.
    pub db: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with default settings.
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    /// Starts a server after `adjust` has changed the config.
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("events.db");
        eventserver::admin::add_user(&db, USER, PASSWORD).expect("add user");
        let (handle, addr) = launch(&db, adjust);
        TestServer {
            handle: Some(handle),
            addr,
            db,
            _dir: dir,
        }
    }

    /// Shuts the server down gracefully and starts a new one on the same database.
    pub fn restart(&mut self) {
        self.restart_with(|_| {});
    }

    /// Like [`TestServer::restart`], with config changes.
    pub fn restart_with(&mut self, adjust: impl FnOnce(&mut Config)) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
        let (handle, addr) = launch(&self.db, adjust);
        self.handle = Some(handle);
        self.addr = addr;
    }

    /// The running server, for what tests read in process (parked polls, publishing).
    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("server is running")
    }

    /// A request with valid credentials.
    pub fn req(&self, method: &str, path: &str) -> Req {
        Req::new(self.addr, method, path).auth(USER, PASSWORD)
    }

    /// A request without credentials.
    pub fn anon(&self, method: &str, path: &str) -> Req {
        Req::new(self.addr, method, path)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
    }
}

fn launch(db: &std::path::Path, adjust: impl FnOnce(&mut Config)) -> (ServerHandle, SocketAddr) {
    let mut config = Config::new(db);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.workers = 4;
    adjust(&mut config);
    let handle = Server::start(config).expect("server starts");
    let addr = handle.addr();
    (handle, addr)
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
