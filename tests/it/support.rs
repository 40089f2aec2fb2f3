//! Test support: start a server on a temp database, speak raw HTTP/1.1 to it, and wait on
//! conditions with deadlines (never fixed sleeps).

#![allow(dead_code)] // each test module uses its own subset of these helpers

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use eventserver::{Config, Server, ServerHandle};

/// User and password every test server has.
pub const USER: &str = "tester";
pub const PASSWORD: &str = "correct horse";

/// A running server on a temporary database.
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub dir: tempfile::TempDir,
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
            dir,
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

/// `Authorization` header value for Basic credentials.
pub fn basic(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A request being built.
#[derive(Clone)]
pub struct Req {
    addr: SocketAddr,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    pub fn new(addr: SocketAddr, method: &str, path: &str) -> Req {
        Req {
            addr,
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn auth(self, user: &str, password: &str) -> Req {
        self.header("Authorization", &basic(user, password))
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = body.into();
        self
    }

    pub fn json(self, value: &serde_json::Value) -> Req {
        self.header("Content-Type", "application/json; charset=utf-8")
            .body(serde_json::to_vec(value).unwrap())
    }

    /// The raw bytes of this request (with `Connection: close`).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\n",
            self.method, self.path, self.addr
        );
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if !self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("Connection: close\r\n\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// Sends the request on a new connection and reads the response (130 s at most).
    pub fn send(&self) -> Resp {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(130)))
            .unwrap();
        stream.write_all(&self.bytes()).expect("write request");
        read_response(&mut BufReader::new(stream)).expect("read response")
    }
}

/// A response as received.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// Sends `req` to `addr` on a new connection and reads the answer, all within `within`.
pub fn try_send(addr: SocketAddr, req: &Req, within: Duration) -> std::io::Result<Resp> {
    let mut stream = TcpStream::connect_timeout(&addr, within)?;
    stream.set_read_timeout(Some(within))?;
    stream.set_write_timeout(Some(within))?;
    stream.write_all(&req.bytes())?;
    read_response(&mut BufReader::new(stream))
}

/// [`try_send`] within 20 s, or the test fails.
#[track_caller]
pub fn send(addr: SocketAddr, req: Req) -> Resp {
    try_send(addr, &req, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("request to {addr} failed: {e}"))
}

/// A request with the test user's credentials.
pub fn authed(addr: SocketAddr, method: &str, path: &str) -> Req {
    Req::new(addr, method, path).auth(USER, PASSWORD)
}

/// Keeps the test runner's environment out of a child eventserver: removes every variable
/// the binary reads besides its arguments (`EVENTSERVER_*`, systemd's `LISTEN_*`,
/// `WATCHDOG_*`, `NOTIFY_SOCKET`, `STATE_DIRECTORY`) and the two whose absence makes it
/// restart itself with small thread stacks and two malloc arenas, as in production.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        let name_str = name.to_string_lossy();
        let read = ["EVENTSERVER_", "LISTEN_", "WATCHDOG_"]
            .iter()
            .any(|prefix| name_str.starts_with(prefix))
            || [
                "NOTIFY_SOCKET",
                "STATE_DIRECTORY",
                "RUST_MIN_STACK",
                "MALLOC_ARENA_MAX",
            ]
            .contains(&name_str.as_ref());
        if read {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// Reads one response with a `Content-Length` or chunked body.
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((n, v)) = trimmed.split_once(':') {
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if find("Transfer-Encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else {
        let len: usize = find("Content-Length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
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
