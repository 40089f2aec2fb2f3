//! The HTTP layer: the only module that names tiny_http.
//!
//! It turns tiny_http requests into [`api::Request`]s and [`api::Response`]s back into
//! bytes, and contains tiny_http's hazards (see `ENGINE-FACTS.md` in the project notes):
//!
//! - **Bodies are judged before they are read.** A body declared over the limit is never
//!   read; the API still authenticates first and then answers 413. Bodies that are not
//!   already buffered by tiny_http are read on a short-lived thread of their own, so a slow
//!   or endless body never holds a worker.
//! - **Unread bodies are never drained on a worker.** tiny_http drains an unread body when
//!   the request is dropped (also after `respond`), allocating the whole declared length at
//!   once: `Content-Length: 100000000000` would abort the process. Moderate leftovers are
//!   drained on a bounded set of drain threads; anything larger is answered through
//!   `upgrade` and the connection is abandoned (kept, never drained) and counted.
//! - **The accept loop is replaced when it dies.** tiny_http's accept thread ends for good
//!   on any `accept()` error (`EMFILE`, `ECONNABORTED`); `recv` then reports the error once.
//!   It also panics, silently, when `try_clone` of a socket it just accepted finds no free
//!   descriptor or a thread spawn fails; then the only sign is that the listener clone it
//!   owns is closed, which the prober checks every tick in `/proc/self/fd`. Either way we
//!   start a new accept loop from our own handle on the listener, while the old one keeps
//!   delivering requests from its open connections until it falls silent.
//! - **The listener is ours**: built with std/socket2, with `SO_KEEPALIVE`, `SO_SNDTIMEO`
//!   and `SO_RCVTIMEO`, which accepted sockets inherit: a client that stops reading or
//!   sending, or idles on a keep-alive connection, is cut after the timeout. The receive
//!   timeout also makes an idle `accept` give up; that ends tiny_http's accept loop, which
//!   is replaced at once like any other (quietly: it is expected).
//! - **A prober keeps the engine honest.** A race in tiny_http's connection pool leaves some
//!   connections of a burst queued with no thread to read them, until other work arrives.
//!   So the prober opens an empty connection every tick, and more while requests arrive or
//!   probes are slow: each makes the pool take the oldest queued connection. Twice a second
//!   it also sends a probe request; when probes stay unanswered (a hung accept loop, or no
//!   /proc to watch) the accept loop is presumed dead and replaced.
//! - **Hang-ups are noticed.** tiny_http sees that a client closed its connection only on
//!   its next read, which a parked request never makes. Every 5 s, while requests are
//!   parked, the prober reads the kernel's socket tables for our connections in
//!   `CLOSE_WAIT` and hands their peers to the server, which releases their polls.
//! - **Pipelined requests never block a worker.** tiny_http writes a connection's responses
//!   in the order it read the requests (which is the order we number them in), so
//!   answering a request pipelined behind an unanswered one (a parked long-poll), or behind
//!   an answer still being written, would block until that one is out. Such answers wait in
//!   order and are written by the thread that writes the one before them, or by a
//!   short-lived thread of their own.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{self, BufRead, Cursor, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::api::{self, Body, Method};

/// Receives every decoded request with the means to answer it, on the thread that decoded
/// it: refused requests ([`api::Request::refused`]) must be answered at once, not queued.
pub type Sink = Arc<dyn Fn(api::Request, api::Reply) + Send + Sync>;

/// Asked every few seconds to let go of requests whose client hung up; the argument finds
/// those clients' addresses (it reads the kernel's socket tables: call it only when some
/// request is being held).
pub type Gone = Arc<dyn Fn(&dyn Fn() -> HashSet<SocketAddr>) + Send + Sync>;

/// How long a write to a client may block before the connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bodies up to this size are already in memory when tiny_http hands the request over.
const BUFFERED_BODY: usize = 1024;
/// Largest unread remainder we let tiny_http drain (it allocates it in one piece).
const DRAIN_CAP: usize = 16 << 20;
/// Drains running at once; beyond it connections are abandoned instead.
const MAX_DRAINS: usize = 16;
/// Threads taking requests from each tiny_http server: one per core on a small host.
const DISPATCHERS: usize = 2;
/// The prober's tick.
const TICK: Duration = Duration::from_millis(100);
/// Ticks between probe requests.
const PROBE_TICKS: u32 = 5;
/// How long a probe may take.
const PROBE_PATIENCE: Duration = Duration::from_millis(500);
/// Unanswered probes in a row before the accept loop is presumed dead and replaced.
const PROBE_MISSES: u32 = 4;
/// Ticks between looks for connections whose client hung up (each look reads the kernel's
/// socket tables: ~20 ms of kernel time at 10,000 connections).
const HANGUP_TICKS: u32 = 50;
/// Most empty connections opened in one tick to unstrand tiny_http's pool.
const PUMP_CONNECTIONS: usize = 16;
/// Empty connections opened every tick regardless (20 a second: negligible work).
const IDLE_PUMPS: usize = 2;
/// Ticks of pumping after the last request arrived.
const PUMP_TICKS: u32 = 10;
/// The request headers the APIs look at.
const API_HEADERS: [&str; 3] = ["Authorization", "X-Producer-ID", "X-Consumer-ID"];
/// Unanswered requests one connection may have before more get 503 at once.
const MAX_PIPELINED: usize = 64;
/// The path of probe requests; answered by the HTTP layer itself.
const PROBE_PATH: &str = "/.eventserver-probe";
/// Stack for our short-lived body and drain threads: they hold nothing deep.
const SMALL_STACK: usize = 128 << 10;
/// Threads a new engine starts: tiny_http's accept thread and the first four of its
/// connection pool, and our dispatchers.
const ENGINE_THREADS: usize = 1 + 4 + DISPATCHERS;

static DRAINS: AtomicUsize = AtomicUsize::new(0);
static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// Binds a listener the way the server wants it.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let listener: TcpListener = socket.into();
    prepare(&listener)?;
    Ok(listener)
}

/// Sets the options accepted sockets inherit: keep-alive probes, a send timeout, no Nagle.
pub fn prepare(listener: &TcpListener) -> io::Result<()> {
    let sock = socket2::SockRef::from(listener);
    sock.set_keepalive(true)?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    // Answers are written whole; Nagle would hold the last segment for the client's
    // delayed ACK (~40 ms per request on keep-alive connections).
    sock.set_tcp_nodelay(true)?;
    Ok(())
}

struct Shared {
    listener: TcpListener,
    addr: SocketAddr,
    sink: Sink,
    gone: Gone,
    max_body: usize,
    read_timeout: Duration,
    stopping: AtomicBool,
    /// What `/proc/self/fd` shows for the listener (`socket:[inode]`), when there is a /proc.
    listener_link: Option<PathBuf>,
    engines: Mutex<Vec<Arc<Engine>>>,
    /// The accept loop to start next, while one is wanted.
    successor: Mutex<Option<Successor>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Probes answered so far.
    probes: AtomicUsize,
    /// Open connections beyond which requests get 503.
    max_connections: usize,
    /// Paths exempt from that.
    uncapped: &'static [&'static str],
    /// Open connections, estimated by the prober from the process's descriptors.
    connections: AtomicUsize,
    /// Descriptors open before any connection (database, listener, logs).
    baseline_fds: usize,
    /// Requests received so far (the prober pumps while this moves).
    arrivals: AtomicUsize,
    /// Disconnects when the server stops, waking the prober at once.
    stopped: crossbeam_channel::Receiver<()>,
    /// Per peer, the sequence numbers of its requests not yet answered, and the next one.
    outstanding: Mutex<HashMap<SocketAddr, Outstanding>>,
}

#[derive(Default)]
struct Outstanding {
    next: u64,
    unanswered: BTreeSet<u64>,
    /// Answers waiting to be written after earlier ones, by sequence number.
    ready: BTreeMap<u64, Ready>,
    /// Whether some thread is writing this connection's answers (then it also writes
    /// `ready` as far as it can).
    writing: bool,
}

impl Outstanding {
    /// The next ready answer whose predecessors are all answered.
    fn take_writable(&mut self) -> Option<Ready> {
        if !self.has_writable() {
            return None;
        }
        self.ready.pop_first().map(|(_, ready)| ready)
    }

    /// Whether the first ready answer could be written now.
    fn has_writable(&self) -> bool {
        self.ready
            .first_key_value()
            .is_some_and(|(seq, _)| self.unanswered.first().is_none_or(|first| first > seq))
    }

    fn idle(&self) -> bool {
        self.unanswered.is_empty() && self.ready.is_empty() && !self.writing
    }
}

/// An answer held until the answers before it on its connection are written.
struct Ready {
    rq: tiny_http::Request,
    unread: Option<usize>,
    response: api::Response,
}

impl Shared {
    /// An accept loop that was replaced retires after this long without a request: by then
    /// every connection it accepted has sent nothing for longer than the read timeout, so
    /// it has been cut.
    fn retire_after(&self) -> Duration {
        self.read_timeout * 2 + Duration::from_secs(10)
    }
}

/// The bounds the HTTP layer enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body read; larger ones are refused unread.
    pub max_body: usize,
    /// A connection silent this long is cut.
    pub read_timeout: Duration,
    /// Open connections beyond which new requests get 503 at once.
    pub max_connections: usize,
    /// Paths served even beyond `max_connections` (health checks: one such request costs
    /// nothing, and a watchdog that only sees 503s restarts a server that is merely busy).
    pub uncapped: &'static [&'static str],
}

/// The running HTTP front end.
pub struct HttpServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop_prober: Mutex<Option<crossbeam_channel::Sender<()>>>,
}

impl HttpServer {
    /// Starts accepting on `listener`, handing every request to `sink`. Connections that
    /// send nothing for `read_timeout` are cut.
    pub fn start(
        listener: TcpListener,
        limits: Limits,
        sink: Sink,
        gone: Gone,
    ) -> io::Result<HttpServer> {
        let Limits {
            max_body,
            read_timeout,
            max_connections,
            uncapped,
        } = limits;
        let addr = listener.local_addr()?;
        let listener_fd = listener.as_raw_fd();
        socket2::SockRef::from(&listener).set_read_timeout(Some(read_timeout))?;
        let mut probe_addr = addr;
        if probe_addr.ip().is_unspecified() {
            probe_addr.set_ip(match addr {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        let (stop_prober, stopped) = crossbeam_channel::bounded(0);
        let shared = Arc::new(Shared {
            listener,
            addr: probe_addr,
            sink,
            gone,
            max_body,
            read_timeout,
            stopping: AtomicBool::new(false),
            listener_link: fd_link(listener_fd),
            engines: Mutex::new(Vec::new()),
            successor: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
            probes: AtomicUsize::new(0),
            max_connections,
            uncapped,
            connections: AtomicUsize::new(0),
            baseline_fds: open_fds().unwrap_or(0),
            arrivals: AtomicUsize::new(0),
            stopped,
            outstanding: Mutex::new(HashMap::new()),
        });
        spawn_dispatchers(&shared, new_engine(&shared)?)?;
        let prober = shared.clone();
        let handle = thread::Builder::new()
            .name("http-probe".into())
            .stack_size(SMALL_STACK)
            .spawn(move || probe_loop(&prober))?;
        keep_thread(&shared, handle);
        Ok(HttpServer {
            shared,
            addr,
            stop_prober: Mutex::new(Some(stop_prober)),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the accept threads to end.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        lock(&self.stop_prober).take();
        let engines = std::mem::take(&mut *lock(&self.shared.engines));
        for engine in &engines {
            for _ in 0..DISPATCHERS {
                engine.server.unblock();
            }
        }
        drop(engines);
        loop {
            let Some(handle) = lock(&self.shared.threads).pop() else {
                break;
            };
            let _ = handle.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new accept loop wanted, and when to (next) try starting it.
struct Successor {
    at: Instant,
    /// Whether to log its start (not after the expected idle timeout).
    announce: bool,
    /// The wait after the next failed attempt.
    pause: Duration,
}

/// One tiny_http server: an accept thread, its connection pool and its request queue.
struct Engine {
    server: tiny_http::Server,
    /// The listener clone the accept thread owns. It is closed when that thread ends, also
    /// when it panics, which it does silently (e.g. EMFILE on the `try_clone` of a socket
    /// it just accepted, or a failed thread spawn): the one sign such a death leaves.
    listener_fd: RawFd,
    /// Whether a newer engine has taken over accepting.
    replaced: AtomicBool,
    /// Threads taking requests from it.
    dispatchers: AtomicUsize,
    /// Held by a dispatch thread from taking a request until it is numbered on its
    /// connection: tiny_http writes a connection's answers strictly in the order it read
    /// the requests, and our numbering must be that order.
    taking: Mutex<()>,
    born: Instant,
}

impl Engine {
    /// Whether the accept thread is known to have ended: its listener is closed.
    fn dead(&self, shared: &Shared) -> bool {
        shared
            .listener_link
            .as_ref()
            .is_some_and(|link| fd_link(self.listener_fd).as_ref() != Some(link))
    }
}

/// What `/proc/self/fd` says descriptor `fd` is, if there is a /proc.
fn fd_link(fd: RawFd) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

/// Starts a tiny_http server on a clone of our listener and registers it; its dispatch
/// threads are started separately.
fn new_engine(shared: &Shared) -> io::Result<Arc<Engine>> {
    let listener = shared.listener.try_clone()?;
    let listener_fd = listener.as_raw_fd();
    // tiny_http panics, rather than failing, when it cannot spawn its accept thread.
    let server = std::panic::catch_unwind(|| tiny_http::Server::from_listener(listener, None))
        .map_err(|_| io::Error::other("cannot spawn the accept thread"))?
        .map_err(|e| io::Error::other(e.to_string()))?;
    let engine = Arc::new(Engine {
        server,
        listener_fd,
        replaced: AtomicBool::new(false),
        dispatchers: AtomicUsize::new(0),
        taking: Mutex::new(()),
        born: Instant::now(),
    });
    lock(&shared.engines).push(engine.clone());
    Ok(engine)
}

/// Starts the threads that take requests from `engine`: [`DISPATCHERS`] of them, or as many
/// as can be spawned, at least one. When none can, the engine is shut down again.
fn spawn_dispatchers(shared: &Arc<Shared>, engine: Arc<Engine>) -> io::Result<()> {
    for _ in 0..DISPATCHERS {
        let (inner, mine) = (shared.clone(), engine.clone());
        let spawned = thread::Builder::new()
            .name("http-dispatch".into())
            .stack_size(SMALL_STACK)
            .spawn(move || accept_loop(&inner, &mine));
        match spawned {
            Ok(handle) => {
                keep_thread(shared, handle);
                engine.dispatchers.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) if engine.dispatchers.load(Ordering::SeqCst) == 0 => {
                // Dropping the last handle on the tiny_http server ends its accept thread.
                lock(&shared.engines).retain(|e| !Arc::ptr_eq(e, &engine));
                return Err(e);
            }
            Err(_) => break,
        }
    }
    Ok(())
}

/// Whether `n` more threads can be started now: spawns them and lets them end at once.
/// tiny_http's pool leaks the threads it started when it fails to start all of its first
/// ones, so a new engine is only started when there is room for all of its threads.
fn room_for_threads(n: usize) -> io::Result<()> {
    let (release, released) = crossbeam_channel::bounded::<()>(0);
    let mut spawned = Vec::with_capacity(n);
    let mut result = Ok(());
    for _ in 0..n {
        let released = released.clone();
        let handle = thread::Builder::new()
            .name("http-room".into())
            .stack_size(SMALL_STACK)
            .spawn(move || {
                let _ = released.recv();
            });
        match handle {
            Ok(handle) => spawned.push(handle),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    drop(release);
    for handle in spawned {
        let _ = handle.join();
    }
    result
}

/// Keeps `handle` to join at shutdown, forgetting threads that have ended already.
fn keep_thread(shared: &Shared, handle: JoinHandle<()>) {
    let mut threads = lock(&shared.threads);
    threads.retain(|t| !t.is_finished());
    threads.push(handle);
}

/// Takes requests from one engine until shutdown, replacing its accept loop if it dies.
/// Several threads share an engine (its queue takes many consumers) so decoding and
/// dispatching spread over the cores.
fn accept_loop(shared: &Arc<Shared>, engine: &Arc<Engine>) {
    let mut last_request = Instant::now();
    loop {
        let taken = {
            let _turn = lock(&engine.taking);
            // A bounded wait, so a thread of a replaced engine notices when it falls silent.
            engine
                .server
                .recv_timeout(Duration::from_secs(1))
                .map(|rq| rq.map(|rq| number(shared, rq)))
        };
        match taken {
            Ok(Some((rq, order))) => {
                last_request = Instant::now();
                dispatch(shared, rq, order);
            }
            Ok(None) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                if engine.replaced.load(Ordering::SeqCst) {
                    // One thread is enough for what a replaced engine still delivers (its
                    // open connections), and threads may be what is short.
                    let spare = engine
                        .dispatchers
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n > 1).then(|| n - 1)
                        })
                        .is_ok();
                    if spare || last_request.elapsed() >= shared.retire_after() {
                        break;
                    }
                }
            }
            Err(_) if shared.stopping.load(Ordering::SeqCst) => break,
            Err(e) => {
                let idle = matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                );
                if idle {
                    // The listener's receive timeout ended an idle accept: expected.
                    succeed(shared, engine, None);
                } else {
                    succeed(shared, engine, Some(&e.to_string()));
                }
            }
        }
    }
    lock(&shared.engines).retain(|e| !Arc::ptr_eq(e, engine));
}

/// Starts a successor to `engine`, whose accept loop has ended (`why`, unless it was the
/// expected idle timeout), unless one was started already.
fn succeed(shared: &Arc<Shared>, engine: &Engine, why: Option<&str>) {
    if engine.replaced.swap(true, Ordering::SeqCst) {
        return;
    }
    // A loop that dies at once again (EMFILE persists) is retried with a pause, so a
    // descriptor shortage does not become a busy loop.
    let delay = if engine.born.elapsed() < Duration::from_secs(1) {
        Duration::from_millis(200)
    } else {
        Duration::ZERO
    };
    match why {
        Some(why) => crate::log::error(&format!(
            "the HTTP accept loop stopped ({why}); starting a new one"
        )),
        None => crate::log::debug("the idle HTTP accept loop timed out; starting a new one"),
    }
    replace(shared, delay, why.is_some());
}

/// Asks for a new accept loop after `delay`; at once (from this thread) when that is zero.
/// Failed attempts (no descriptors, no threads) are retried by the prober, which needs
/// nothing new to run.
fn replace(shared: &Arc<Shared>, delay: Duration, announce: bool) {
    {
        let mut pending = lock(&shared.successor);
        let successor = pending.get_or_insert(Successor {
            at: Instant::now() + delay,
            announce,
            pause: Duration::from_millis(200),
        });
        successor.announce |= announce;
    }
    if delay.is_zero() {
        start_successor(shared);
    }
}

/// Starts the accept loop [`replace`] asked for, if it is due.
fn start_successor(shared: &Arc<Shared>) {
    let mut pending = lock(&shared.successor);
    let Some(successor) = pending.as_mut() else {
        return;
    };
    if successor.at > Instant::now() || shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    let started = room_for_threads(ENGINE_THREADS * 2)
        .and_then(|()| new_engine(shared))
        .and_then(|e| spawn_dispatchers(shared, e));
    match started {
        Ok(()) => {
            if successor.announce {
                crate::log::info("a new HTTP accept loop is running");
            }
            *pending = None;
        }
        Err(e) => {
            crate::log::error(&format!("cannot restart the accept loop yet: {e}"));
            successor.at = Instant::now() + successor.pause;
            successor.pause = (successor.pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// Pumps tiny_http's pool while requests arrive and probes the accept loop; see the
/// module docs.
fn probe_loop(shared: &Arc<Shared>) {
    let (mut tick, mut misses, mut active) = (0u32, 0u32, 0u32);
    let mut seen = shared.arrivals.load(Ordering::Relaxed);
    loop {
        if shared
            .stopped
            .recv_timeout(TICK)
            .is_err_and(|e| e.is_disconnected())
        {
            return;
        }
        let dead: Vec<Arc<Engine>> = lock(&shared.engines)
            .iter()
            .filter(|e| !e.replaced.load(Ordering::SeqCst) && e.dead(shared))
            .cloned()
            .collect();
        for engine in dead {
            succeed(shared, &engine, Some("its thread ended"));
        }
        start_successor(shared);
        let arrivals = shared.arrivals.load(Ordering::Relaxed);
        let fresh = arrivals.wrapping_sub(seen);
        seen = arrivals;
        if fresh > 0 {
            active = PUMP_TICKS;
        }
        // A few pumps every tick: connections that never complete a request (idle or slow
        // clients) get stranded too, and they do not count as arrivals.
        let pumps = if active > 0 {
            active -= 1;
            fresh.clamp(IDLE_PUMPS, PUMP_CONNECTIONS)
        } else {
            IDLE_PUMPS
        };
        for _ in 0..pumps {
            let _ = TcpStream::connect_timeout(&shared.addr, PROBE_PATIENCE);
        }
        tick += 1;
        if tick % HANGUP_TICKS == 0 {
            let port = shared.addr.port();
            (shared.gone)(&|| hung_up(port));
        }
        if tick % PROBE_TICKS != 0 {
            continue;
        }
        if let Some(fds) = open_fds() {
            // tiny_http holds two descriptors per connection.
            let estimate = fds.saturating_sub(shared.baseline_fds) / 2;
            shared.connections.store(estimate, Ordering::Relaxed);
        }
        let started = Instant::now();
        if probe(shared) {
            misses = 0;
            if started.elapsed() > TICK {
                // A slow probe waited in the pool's queue: pump hard for a while.
                active = PUMP_TICKS;
            }
            continue;
        }
        active = PUMP_TICKS;
        misses += 1;
        if misses == PROBE_MISSES && !shared.stopping.load(Ordering::SeqCst) {
            crate::log::error("probe requests go unanswered; starting a new HTTP accept loop");
            replace(shared, Duration::ZERO, true);
        }
    }
}

/// Peers of our connections that the client has closed while we still hold them
/// (`CLOSE_WAIT`), from the kernel's socket tables. tiny_http notices a hang-up only on its
/// next read, which a parked request never makes; an empty set without /proc.
fn hung_up(port: u16) -> HashSet<SocketAddr> {
    const CLOSE_WAIT: &str = "08";
    let mut peers = HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        // Line by line: the table has a line per socket, megabytes at 10,000 connections.
        let Ok(file) = std::fs::File::open(table) else {
            continue;
        };
        for line in io::BufReader::new(file).lines().skip(1) {
            let Ok(line) = line else {
                break;
            };
            let mut fields = line.split_whitespace().skip(1);
            let (Some(local), Some(remote), Some(CLOSE_WAIT)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if proc_net_addr(local).is_some_and(|a| a.port() == port) {
                peers.extend(proc_net_addr(remote));
            }
        }
    }
    peers
}

/// An address as `/proc/net/tcp{,6}` write it: the IP as 32-bit words in host byte order,
/// then `:` and the port, all in hex (`0100007F:1F90` is 127.0.0.1:8080 here).
fn proc_net_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if ip.len() != 8 && ip.len() != 32 {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
        Ok(v4) => IpAddr::from(v4),
        Err(_) => IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
    };
    Some(SocketAddr::new(ip, port))
}

/// Descriptors this process has open, if /proc tells.
fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count)
}

/// Whether a probe request is answered within [`PROBE_PATIENCE`].
fn probe(shared: &Shared) -> bool {
    let before = shared.probes.load(Ordering::SeqCst);
    let Ok(mut stream) = TcpStream::connect_timeout(&shared.addr, PROBE_PATIENCE) else {
        return false;
    };
    let request = format!("GET {PROBE_PATH} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let _ = stream.set_read_timeout(Some(PROBE_PATIENCE));
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).is_ok() || shared.probes.load(Ordering::SeqCst) > before
}

fn header_value<'a>(rq: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    rq.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// A request's connection, its place among the connection's unanswered requests, and
/// whether it is one too many of them.
#[derive(Clone, Copy)]
struct Order {
    peer: SocketAddr,
    seq: u64,
    flooding: bool,
}

/// Numbers `rq` on its connection.
fn number(shared: &Shared, rq: tiny_http::Request) -> (tiny_http::Request, Option<Order>) {
    let order = rq.remote_addr().copied().map(|peer| {
        let mut outstanding = lock(&shared.outstanding);
        let entry = outstanding.entry(peer).or_default();
        let seq = entry.next;
        entry.next += 1;
        entry.unanswered.insert(seq);
        Order {
            peer,
            seq,
            flooding: entry.unanswered.len() > MAX_PIPELINED,
        }
    });
    (rq, order)
}

/// Decodes the request line and headers, then gets the body without ever blocking this
/// thread on the client.
fn dispatch(shared: &Arc<Shared>, rq: tiny_http::Request, order: Option<Order>) {
    let declared = rq.body_length();
    let chunked = header_value(&rq, "Transfer-Encoding").is_some();
    let expects = header_value(&rq, "Expect").is_some();
    let order = order.map(|o| (shared.clone(), o));
    // The prober's request, exactly as it sends it; anything else on that path (a body
    // above all, which tiny_http would drain after the answer) is an ordinary request.
    let bodiless = declared.unwrap_or(0) == 0 && !chunked && !expects;
    if rq.url() == PROBE_PATH && *rq.method() == tiny_http::Method::Get && bodiless {
        shared.probes.fetch_add(1, Ordering::SeqCst);
        let responder = Responder {
            rq: Some(rq),
            unread: None,
            order,
        };
        return responder.send(api::Response::json(204, api::JSON_UTF8, &b""[..]));
    }
    shared.arrivals.fetch_add(1, Ordering::Relaxed);
    // Two framings for one body (differing Content-Lengths, or Content-Length with
    // Transfer-Encoding) are how requests get smuggled past proxies: refuse, unread.
    let mut lengths = rq
        .headers()
        .iter()
        .filter(|h| h.field.equiv("Content-Length"))
        .map(|h| h.value.as_str().trim());
    let first_length = lengths.next();
    let ambiguous = lengths.any(|l| Some(l) != first_length) || (chunked && first_length.is_some());
    let (path, query) = match rq.url().split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (rq.url().to_owned(), String::new()),
    };
    let method = match rq.method() {
        tiny_http::Method::Get => Method::Get,
        tiny_http::Method::Post => Method::Post,
        tiny_http::Method::Head => Method::Head,
        other => Method::Other(other.as_str().to_owned()),
    };
    // Only the headers the APIs read are copied; the rest stay with tiny_http.
    let headers = rq
        .headers()
        .iter()
        .filter(|h| API_HEADERS.iter().any(|name| h.field.equiv(name)))
        .map(|h| {
            (
                h.field.as_str().as_str().to_owned(),
                h.value.as_str().to_owned(),
            )
        })
        .collect();
    let mut req = api::Request {
        method,
        path,
        query,
        headers,
        body: Body::Bytes(Vec::new()),
        remote: rq.remote_addr().copied(),
        refused: None,
    };
    let flooding = order.as_ref().is_some_and(|(_, o)| o.flooding);
    // Until the body is read, answering must not leave it to tiny_http to drain: every
    // early answer below inherits this.
    let unread = if chunked || expects {
        declared.or(Some(usize::MAX))
    } else {
        declared.filter(|n| *n > BUFFERED_BODY)
    };
    let mut responder = Responder {
        rq: Some(rq),
        unread,
        order,
    };
    let capped = !shared.uncapped.contains(&req.path.as_str());
    if capped && shared.connections.load(Ordering::Relaxed) > shared.max_connections {
        // Refused quickly rather than left to pile up toward the descriptor limit.
        req.refused = Some(api::Failure::TooManyConnections);
        return deliver_request(shared, req, responder);
    }
    if flooding {
        // One connection may not fill the workers' queue for everyone else.
        req.refused = Some(api::Failure::TooManyPipelined);
        return deliver_request(shared, req, responder);
    }
    if ambiguous {
        // No length can be trusted, so the rest of the stream cannot be read as requests:
        // the connection is given up after the answer.
        responder.unread = Some(usize::MAX);
        req.body = Body::Unreadable;
        return deliver_request(shared, req, responder);
    }
    if let Some(n) = declared.filter(|n| *n > shared.max_body) {
        responder.unread = Some(n);
        req.body = Body::TooLarge;
        return deliver_request(shared, req, responder);
    }
    let buffered = !chunked && !expects && declared.unwrap_or(0) <= BUFFERED_BODY;
    if buffered {
        return read_then_deliver(shared, req, responder);
    }
    let inner = shared.clone();
    let spawned = thread::Builder::new()
        .name("http-body".into())
        .stack_size(SMALL_STACK)
        .spawn(move || read_then_deliver(&inner, req, responder));
    if let Err(e) = spawned {
        crate::log::error(&format!("cannot spawn a body reader: {e}"));
    }
}

/// Reads the body (up to the limit) and hands the request on.
fn read_then_deliver(shared: &Arc<Shared>, mut req: api::Request, mut responder: Responder) {
    let rq = responder
        .rq
        .as_mut()
        .expect("a fresh responder holds its request");
    let limit = shared.max_body as u64 + 1;
    let mut body = Vec::new();
    let declared = rq.body_length();
    // What is left unread if reading stops early: unknown for a chunked body.
    let rest = |read: usize| Some(declared.map_or(usize::MAX, |n| n.saturating_sub(read)));
    (req.body, responder.unread) = match rq.as_reader().take(limit).read_to_end(&mut body) {
        Ok(_) if body.len() > shared.max_body => (Body::TooLarge, rest(body.len())),
        // A body that ends before its declared length is a broken request, not a short one.
        Ok(_) if declared.is_some_and(|n| body.len() < n) => (Body::Unreadable, None),
        Ok(_) => (Body::Bytes(body), None),
        Err(_) => (Body::Unreadable, rest(body.len())),
    };
    deliver_request(shared, req, responder);
}

fn deliver_request(shared: &Shared, req: api::Request, responder: Responder) {
    (shared.sink)(
        req,
        api::Reply::new(move |response| responder.send(response)),
    );
}

/// Answers one request exactly once; dropped unanswered, it answers 500.
struct Responder {
    rq: Option<tiny_http::Request>,
    /// The declared length of a body that was never read.
    unread: Option<usize>,
    /// The connection's peer and this request's place among its requests.
    order: Option<(Arc<Shared>, Order)>,
}

impl Responder {
    fn send(mut self, response: api::Response) {
        self.answer(response);
    }

    /// Writes the answer now, then any of the connection's answers that became writable
    /// meanwhile, unless an earlier request on the same connection is still unanswered or
    /// being written: then it waits in order for whichever thread writes that one, since
    /// tiny_http would block this thread until the earlier answer is out.
    fn answer(&mut self, response: api::Response) {
        let Some(rq) = self.rq.take() else { return };
        let Some((shared, Order { peer, seq, .. })) = self.order.take() else {
            return deliver(rq, self.unread, response);
        };
        let mut outstanding = lock(&shared.outstanding);
        let Some(entry) = outstanding.get_mut(&peer) else {
            drop(outstanding);
            return deliver(rq, self.unread, response);
        };
        entry.unanswered.remove(&seq);
        let behind = entry.unanswered.first().is_some_and(|first| *first < seq);
        if !behind && !entry.writing && entry.ready.is_empty() {
            // This thread writes it; answers that come meanwhile wait in `ready` instead of
            // blocking more threads in tiny_http behind this write (a client that reads
            // slowly could otherwise hold every worker).
            entry.writing = true;
            drop(outstanding);
            deliver(rq, self.unread, response);
            return write_in_order(&shared, peer);
        }
        let unread = self.unread;
        entry.ready.insert(
            seq,
            Ready {
                rq,
                unread,
                response,
            },
        );
        if entry.writing || !entry.has_writable() {
            // A writer is at work, or an earlier answer is still to come: whoever answers
            // that one starts the writer.
            return;
        }
        entry.writing = true;
        drop(outstanding);
        let writer_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name("http-ordered".into())
            .stack_size(SMALL_STACK)
            .spawn(move || write_in_order(&writer_shared, peer));
        if let Err(e) = spawned {
            crate::log::error(&format!(
                "cannot spawn an ordered writer, writing here: {e}"
            ));
            write_in_order(&shared, peer);
        }
    }
}

/// Writes a connection's held answers in order until the next one must wait.
fn write_in_order(shared: &Shared, peer: SocketAddr) {
    loop {
        let next = {
            let mut outstanding = lock(&shared.outstanding);
            let Some(entry) = outstanding.get_mut(&peer) else {
                return;
            };
            let next = entry.take_writable();
            if next.is_none() {
                entry.writing = false;
                if entry.idle() {
                    outstanding.remove(&peer);
                }
            }
            next
        };
        match next {
            Some(ready) => deliver(ready.rq, ready.unread, ready.response),
            None => return,
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.rq.is_some() {
            self.answer(api::Failure::NotAnswered.render(api::Api::Streams));
        }
    }
}

fn tiny_response(response: &api::Response, close: bool) -> tiny_http::Response<Cursor<Arc<[u8]>>> {
    let mut headers = Vec::with_capacity(response.headers.len() + 2);
    headers.push(header("Server", "eventserver"));
    if close {
        // tiny_http refuses to set `Connection` itself; a client about to send a large body
        // should learn that it can stop.
        headers.push(header("X-Close", "1\r\nConnection: close"));
    }
    for (name, value) in &response.headers {
        headers.push(header(name, value));
    }
    let len = response.body.len();
    // The length is always known: send it rather than tiny_http's default of chunking
    // anything over 32 KiB.
    tiny_http::Response::new(
        tiny_http::StatusCode(response.status),
        headers,
        Cursor::new(response.body.clone()),
        Some(len),
        None,
    )
    .with_chunked_threshold(usize::MAX)
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
        .unwrap_or_else(|_| tiny_http::Header::from_bytes("X-Invalid-Header", "1").expect("ASCII"))
}

/// Writes a response without ever draining a large unread body on this thread.
fn deliver(rq: tiny_http::Request, unread: Option<usize>, response: api::Response) {
    let Some(remaining) = unread else {
        let _ = rq.respond(tiny_response(&response, false));
        return;
    };
    if remaining <= DRAIN_CAP && DRAINS.fetch_add(1, Ordering::SeqCst) < MAX_DRAINS {
        let tiny = tiny_response(&response, true);
        let spawned = thread::Builder::new()
            .name("http-drain".into())
            .stack_size(SMALL_STACK)
            .spawn(move || {
                // `respond` writes the answer, then tiny_http drains the rest of the body.
                let _ = rq.respond(tiny);
                DRAINS.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(_) => return,
            Err(e) => {
                DRAINS.fetch_sub(1, Ordering::SeqCst);
                crate::log::error(&format!("cannot spawn a drain thread: {e}"));
                // The request went into the failed closure and was dropped with it; tiny_http
                // drained it on this thread. Nothing is left to answer.
                return;
            }
        }
    }
    if remaining <= DRAIN_CAP {
        DRAINS.fetch_sub(1, Ordering::SeqCst);
    }
    abandon(rq, &response);
}

/// Answers through `upgrade`, which hands us the connection instead of draining it, then
/// keeps the connection forever: dropping it would make tiny_http allocate the declared
/// length in one piece, or read what follows a request framed two ways as requests. Costs
/// one parked tiny_http thread and two descriptors.
fn abandon(rq: tiny_http::Request, response: &api::Response) {
    // In upgrade mode tiny_http writes neither the body nor its length, so both are ours;
    // the extra header lines travel inside the `Upgrade` value.
    let framing = format!(
        "none\r\nContent-Length: {}\r\nConnection: close",
        response.body.len()
    );
    let head = api::Response {
        body: Arc::from(&b""[..]),
        ..response.clone()
    };
    let mut stream = rq.upgrade(&framing, tiny_response(&head, false));
    let _ = stream.write_all(&response.body);
    let _ = stream.flush();
    std::mem::forget(stream);
    let total = ABANDONED.fetch_add(1, Ordering::Relaxed) + 1;
    crate::log::warn(&format!(
        "abandoned a connection rather than read the rest of it (a body too large to drain, \
         or framed two ways; {total} so far)"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse_in_host_order() {
        let v4 = u32::from_ne_bytes([127, 0, 0, 1]);
        let field = format!("{v4:08X}:1F90");
        assert_eq!(
            proc_net_addr(&field),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        let one = u32::from_ne_bytes([0, 0, 0, 1]);
        let field = format!("000000000000000000000000{one:08X}:0050");
        assert_eq!(proc_net_addr(&field), Some("[::1]:80".parse().unwrap()));
        for bad in [
            "",
            "0100007F",
            "0100007F:",
            "XYZ:1F90",
            "0100:1F90",
            "0100007F:1F90:1",
        ] {
            assert_eq!(proc_net_addr(bad), None, "{bad}");
        }
    }
}
