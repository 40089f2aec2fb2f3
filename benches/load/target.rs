//! The server under load: started in this process through the library, spawned as the
//! real `eventserver` binary (for scenarios whose connections would not fit in one process's
//! descriptors, and for memory figures), or an external server given with `--url`.
//!
//! With `--db postgres://…` the bench spawns `--nodes N` binaries (1 by default), each on a
//! free port and all on that database, after adding its user there with the binary's own
//! `user add`; the scenarios spread their connections over the nodes ([`Target::nodes`]).
//! Only a binary built with the `postgres` feature can: one built without it refuses the URL
//! with exit status 2, which the bench turns into an error saying how to build it.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wire::Site;

/// How the bench reaches a server.
#[derive(Clone, Debug)]
pub enum Source {
    /// Start one per scenario (in process or as a child, as the scenario needs).
    Own {
        /// The `eventserver` binary to spawn when a scenario needs its own process.
        bin: PathBuf,
        /// Worker threads (`--workers`) for servers the bench starts.
        workers: Option<usize>,
        /// Diagnostic: start in-process servers on a listener with `TCP_NODELAY`, which
        /// accepted sockets inherit (shows what Nagle's algorithm costs the server).
        nodelay: bool,
        /// Load the bare tiny_http server of `floor.rs` instead of eventserver.
        floor: bool,
        /// Spawn eventserver even where in process would do, as the floor always is
        /// (`--versus-floor`: both sides then run alike).
        own_process: bool,
        /// `--db`: a PostgreSQL URL the spawned nodes share, instead of a temporary SQLite
        /// file per server.
        postgres: Option<String>,
        /// `--nodes`: how many servers to spawn on `postgres` (1 on SQLite).
        nodes: usize,
    },
    /// A server someone else runs.
    External {
        /// Its loopback address.
        addr: SocketAddr,
        /// Basic credentials.
        user: String,
        /// Basic credentials.
        password: String,
        /// Its process, for memory and thread figures.
        pid: Option<u32>,
    },
}

/// Where a scenario needs its server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Need {
    /// In process is fine (few connections, no memory figures).
    Any,
    /// A process of its own: many connections, or memory figures of the server alone.
    OwnProcess,
}

enum Running {
    External,
    InProcess(Box<eventserver::ServerHandle>),
    /// One child per node.
    Spawned(Vec<Child>),
}

/// A running server with what it takes to talk to it.
pub struct Target {
    /// Address and credentials of the first node (the only one unless several were spawned
    /// on PostgreSQL): setup work and paced publishers go there.
    pub site: Site,
    /// Every node's address, the first being `site`'s: connections spread over them.
    pub nodes: Vec<SocketAddr>,
    /// The first node's own process id, when it runs apart from the bench.
    pub pid: Option<u32>,
    /// How it runs: "in-process", "spawned", "floor", "external", or for PostgreSQL
    /// "postgres" (one node) or "postgres-xN".
    pub kind: String,
    running: Running,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    /// A server as `need` asks for, from `source`.
    pub fn start(source: &Source, need: Need) -> Result<Target, String> {
        match source {
            Source::External {
                addr,
                user,
                password,
                pid,
            } => Ok(Target {
                site: Site::new(*addr, user, password),
                nodes: vec![*addr],
                pid: *pid,
                kind: "external".into(),
                running: Running::External,
                _dir: None,
            }),
            Source::Own { floor: true, .. } => spawn_floor(),
            Source::Own {
                bin,
                workers,
                postgres: Some(url),
                nodes,
                ..
            } => spawn_nodes(bin, *workers, url, *nodes),
            Source::Own {
                bin,
                workers,
                nodelay,
                floor: false,
                own_process,
                postgres: None,
                ..
            } => match need {
                Need::Any if !own_process => in_process(*workers, *nodelay),
                _ => spawn(bin, *workers),
            },
        }
    }

    /// Every node's address and credentials, the first node's first.
    pub fn node_sites(&self) -> Vec<Site> {
        self.nodes
            .iter()
            .map(|&addr| Site {
                addr,
                ..self.site.clone()
            })
            .collect()
    }

    /// Long-polls parked right now, when the server runs in this process.
    pub fn parked(&self) -> Option<usize> {
        match &self.running {
            Running::InProcess(handle) => Some(handle.parked()),
            _ => None,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        match &mut self.running {
            Running::External => {}
            Running::InProcess(handle) => handle.shutdown(),
            Running::Spawned(children) => {
                for child in children.iter() {
                    let pid = rustix::process::Pid::from_child(child);
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                let until = Instant::now() + Duration::from_secs(30);
                for child in children.iter_mut() {
                    while Instant::now() < until {
                        if let Ok(Some(_)) = child.try_wait() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if let Ok(None) = child.try_wait() {
                        eprintln!("load: a spawned server did not stop within 30 s; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            }
        }
    }
}

const USER: &str = "bench";

fn fresh_db() -> Result<(tempfile::TempDir, PathBuf, String), String> {
    let dir = tempfile::Builder::new()
        .prefix("eventserver-load")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let db = dir.path().join("events.db");
    let password = uuid::Uuid::new_v4().simple().to_string();
    eventserver::admin::add_user(&db, USER, &password)
        .map_err(|e| format!("cannot add the bench user: {e}"))?;
    Ok((dir, db, password))
}

fn in_process(workers: Option<usize>, nodelay: bool) -> Result<Target, String> {
    let (dir, db, password) = fresh_db()?;
    let mut config = eventserver::Config::new(&db);
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    if let Some(w) = workers {
        config.workers = w;
    }
    let handle = if nodelay {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .and_then(|s| {
                s.set_tcp_nodelay(true)?;
                s.set_reuse_address(true)?;
                s.bind(&config.listen.into())?;
                s.listen(1024)?;
                Ok(s)
            })
            .map_err(|e| format!("cannot bind a listener: {e}"))?;
        eventserver::Server::start_on(socket.into(), config)
    } else {
        eventserver::Server::start(config)
    }
    .map_err(|e| format!("cannot start the server: {e}"))?;
    Ok(Target {
        site: Site::new(handle.addr(), USER, &password),
        nodes: vec![handle.addr()],
        pid: None,
        kind: "in-process".into(),
        running: Running::InProcess(Box::new(handle)),
        _dir: Some(dir),
    })
}

fn spawn(bin: &PathBuf, workers: Option<usize>) -> Result<Target, String> {
    let (dir, db, password) = fresh_db()?;
    let addr = free_port()?;
    let mut target = run_child(serve(bin, addr, db.as_os_str(), workers), addr, &password)?;
    target._dir = Some(dir);
    Ok(target)
}

/// `bin serve` on `addr` and `db`.
fn serve(bin: &PathBuf, addr: SocketAddr, db: &OsStr, workers: Option<usize>) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--db")
        .arg(db)
        // One log line per request would flood this terminal and cost the server time that
        // is not what the scenarios measure; warnings and errors still come through.
        .env("EVENTSERVER_LOG", "warn");
    if let Some(w) = workers {
        cmd.arg("--workers").arg(w.to_string());
    }
    cmd
}

/// `nodes` servers on the PostgreSQL database `url`, after adding the bench's user there.
fn spawn_nodes(
    bin: &PathBuf,
    workers: Option<usize>,
    url: &str,
    nodes: usize,
) -> Result<Target, String> {
    let password = uuid::Uuid::new_v4().simple().to_string();
    add_user_with(bin, url, &password)?;
    let mut target: Option<Target> = None;
    for _ in 0..nodes {
        let addr = free_port()?;
        let node = run_child(serve(bin, addr, url.as_ref(), workers), addr, &password)?;
        match &mut target {
            None => target = Some(node),
            Some(first) => first.adopt(node),
        }
    }
    let mut target = target.ok_or("--nodes must be at least 1")?;
    target.kind = match nodes {
        1 => "postgres".into(),
        n => format!("postgres-x{n}"),
    };
    Ok(target)
}

impl Target {
    /// Takes `node`'s process and address as one more node of this target.
    fn adopt(&mut self, mut node: Target) {
        self.nodes.append(&mut node.nodes);
        if let (Running::Spawned(mine), Running::Spawned(theirs)) =
            (&mut self.running, &mut node.running)
        {
            mine.append(theirs);
        }
    }
}

/// Adds the bench's user to `url` with `bin user add`, so that the binary that serves is
/// the one that proves it speaks PostgreSQL.
fn add_user_with(bin: &PathBuf, url: &str, password: &str) -> Result<(), String> {
    let mut child = Command::new(bin)
        .args(["user", "add", USER, "--db", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        writeln!(stdin, "{password}")
            .map_err(|e| format!("cannot give {} the password: {e}", bin.display()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let said = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Ok(()),
        // A build without the feature refuses the URL as a usage error.
        Some(2) if said.contains("--features postgres") => Err(format!(
            "{} was built without PostgreSQL: run the bench as `cargo bench --features \
             postgres --bench load -- …` (its server is built alongside with the same \
             features), or give --server-bin a binary built with `cargo build --release \
             --features postgres`; it said: {}",
            bin.display(),
            said.trim()
        )),
        _ => Err(format!(
            "{} user add on the --db database failed ({}): {}",
            bin.display(),
            out.status,
            said.trim()
        )),
    }
}

/// This bench's own executable serving as the bare tiny_http server (`floor.rs`).
fn spawn_floor() -> Result<Target, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this bench: {e}"))?;
    let addr = free_port()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--floor-server").arg(addr.to_string());
    let mut target = run_child(cmd, addr, "unused")?;
    target.kind = "floor".into();
    Ok(target)
}

/// A free port, picked by binding port 0 and letting go of it; the server binds it a moment
/// later (a race with other programs taking ports, which loopback rarely loses).
fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// Starts `cmd`, passes its stderr through, and waits until it answers on `addr`.
fn run_child(mut cmd: Command, addr: SocketAddr, password: &str) -> Result<Target, String> {
    let bin = PathBuf::from(cmd.get_program());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    std::thread::Builder::new()
        .name("server-log".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
            }
        })
        .map_err(|e| format!("cannot start the log thread: {e}"))?;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{} exited at start: {status}", bin.display()));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            break;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} did not listen on {addr} within 30 s",
                bin.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Target {
        site: Site::new(addr, USER, password),
        nodes: vec![addr],
        pid: Some(child.id()),
        kind: "spawned".into(),
        running: Running::Spawned(vec![child]),
        _dir: None,
    })
}

/// Resolves `http://HOST:PORT[/]` to a loopback address; anything else is refused, since
/// the bench only ever loads servers on this machine.
pub fn parse_url(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url must start with http:// (got {url:?})"))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| format!("--url {url:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.ip().is_loopback())
        .copied()
        .ok_or_else(|| {
            format!("--url {url:?} is not a loopback address; the bench loads only this machine")
        })
}
