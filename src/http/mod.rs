//! The HTTP layer: the only module that names tiny_http.
//!
//! It turns tiny_http requests into [`api::Request`]s and [`api::Response`]s back into
//! bytes, and keeps tiny_http 0.12's hazards from reaching the rest of the server. By
//! concern:
//!
//! - `exchange`: decoding a request (its refusals, its body under the size cap) and writing
//!   an answer without ever draining a large unread body on a worker, or handing the
//!   connection over, non-blocking, for a stream of events;
//! - `order`: answering each request exactly once, in its connection's order;
//! - `engine`: the tiny_http servers on our listener, the threads taking requests from
//!   them, and replacing one whose accept loop died;
//! - `prober`: the thread that keeps tiny_http moving and watches it: pump connections,
//!   probe requests, hang-up scans.
//!
//! This file holds the public face ([`bind`], [`prepare`], [`HttpServer`]) and the state
//! the four share.
//!
//! # What tiny_http 0.12 does that this layer relies on
//!
//! Each behaviour with the tests that reproduce it, or fail without what this layer does
//! about it: those in `tests/it` by module and name, this file's own as `tests::…`.
//!
//! - **A thread per connection, no timeouts.** Every open connection holds a thread of
//!   tiny_http's pool (which spawns whenever none is free) and two descriptors, the socket
//!   and a clone (`abuse::two_thousand_idle_connections_reserve_well_under_a_gigabyte`). It
//!   sets no timeout of its own, so a silent client would hold them forever
//!   (`abuse::slow_heads_are_cut_while_fresh_connections_are_served`,
//!   `abuse::a_body_that_never_finishes_is_cut_after_the_read_timeout`).
//! - **`Server::num_connections` is not implemented: it panics**
//!   (`tests::tiny_http_cannot_count_its_connections`): open connections are estimated from
//!   the process's descriptors instead (`abuse::connections_beyond_the_cap_get_503_quickly`).
//! - **The accept loop dies for good** on any `accept()` error (`EMFILE`, `ECONNABORTED`);
//!   `recv` then reports the error once (`abuse::the_accept_loop_survives_emfile_and_recovers`).
//!   With `SO_RCVTIMEO` on the listener an idle `accept` times out, which ends it the same
//!   way, and then the listener clone it owned is closed
//!   (`tests::tiny_http_ends_its_accept_loop_when_an_idle_accept_times_out`). It also
//!   panics, silently, when the `try_clone` of a socket it just accepted finds no free
//!   descriptor or a connection thread cannot be spawned: then the only sign is that the
//!   listener clone it owns is closed
//!   (`abuse::the_accept_loop_survives_a_failed_thread_spawn`, run by `.ci/run` as root).
//!   `Server::from_listener` panics rather than failing when it cannot spawn that thread,
//!   and the pool leaks the threads it started when it cannot start all four of its first
//!   ones (the same test).
//! - **An unread body is drained with one allocation of its declared length** when the
//!   request is dropped, also after `respond`: `Content-Length: 100000000000` would abort
//!   the process, and a slow sender would hold the thread
//!   (`bad_input::bodies_over_the_limit_and_lying_lengths`,
//!   `streams::huge_declared_body_gets_413_while_others_are_served`,
//!   `abuse::the_probe_path_takes_no_body`). `upgrade` hands the connection over undrained.
//!   Bodies up to 1 KiB are read before the request is handed over.
//! - **Burst stranding.** A race in the connection pool leaves some connections of a burst
//!   queued with no thread to read them until other work arrives (1–70 of 300 in five runs
//!   of bare tiny_http here; `abuse::a_burst_of_300_connections_is_answered_within_2_s`).
//! - **Pipelined answers are written in request order**: answering a request blocks until
//!   every answer before it on its connection is written
//!   (`abuse::a_request_pipelined_behind_a_parked_long_poll_leaves_the_worker_free`,
//!   `abuse::pipelined_long_polls_are_all_answered_in_order`,
//!   `abuse::a_client_that_never_reads_its_answers_holds_one_worker_at_most`). Pipelined
//!   requests are read ahead without limit (`abuse::unbounded_pipelining_keeps_memory_bounded`,
//!   ignored, with the figure measured) and a flood of them must not fill the workers' queue
//!   (`abuse::a_pipelining_flood_does_not_take_the_server_down`).
//! - **A dropped `Request` answers a bare 500**
//!   (`tests::tiny_http_answers_a_dropped_request_with_a_bare_500`): every request is
//!   answered, and one dropped unanswered (by a handler that panicked) answers a 500 that
//!   says so (`abuse::a_panicking_handler_answers_500_and_the_pool_never_shrinks`).
//! - **A hang-up is seen only on the next read**, which a parked request never makes
//!   (`longpoll::a_poll_whose_client_hangs_up_is_released`). After a reset its connection
//!   thread may end and close one descriptor, but the request keeps the other until answered
//!   (`abuse::a_poll_whose_client_resets_is_released_with_its_descriptors`).
//!
//! # How this layer contains them
//!
//! - **Bodies are judged before they are read.** A body declared over the limit is never
//!   read; the API still authenticates first and then answers 413. Bodies that are not
//!   already buffered by tiny_http are read on a short-lived thread of their own, so a slow
//!   or endless body never holds a worker.
//! - **Unread bodies are never drained on a worker.** Moderate leftovers are drained on a
//!   bounded set of drain threads; anything larger is answered through `upgrade` and the
//!   connection is abandoned (kept, never drained) and counted.
//! - **The accept loop is replaced when it dies.** A dispatch thread that gets an error from
//!   `recv`, or the prober that finds the engine's listener clone closed in `/proc/self/fd`,
//!   starts a new accept loop from our own handle on the listener, while the old one keeps
//!   delivering requests from its open connections until it falls silent. An idle accept
//!   timing out is replaced the same way, quietly: it is expected.
//! - **The listener is ours**: built with std/socket2, with `SO_KEEPALIVE`, `SO_SNDTIMEO`
//!   and `SO_RCVTIMEO`, which accepted sockets inherit: a client that stops reading or
//!   sending, or idles on a keep-alive connection, is cut after the timeout.
//! - **A prober keeps the engine honest.** It opens empty "pump" connections every tick,
//!   and more while requests arrive or probe requests are slow: each makes the pool take the
//!   oldest stranded connection. Twice a second it sends a probe request; when probes stay
//!   unanswered (a hung accept loop, or no /proc to watch) the accept loop is presumed dead
//!   and replaced. Every 2 s, while requests are parked, it hands the server a way to read
//!   the kernel's socket table for the peers still connected and by which socket; the
//!   server releases the polls of the others (closed, half-closed or reset, or replaced by
//!   a new connection from the same port, which answer order would otherwise hold behind
//!   the old poll).
//! - **Pipelined requests never block a worker.** Requests are numbered per connection in
//!   the order tiny_http read them; an answer behind an unanswered one (a parked long-poll),
//!   or behind an answer still being written, waits in order and is written by the thread
//!   that writes the one before it, or by a short-lived thread of its own. More than
//!   `MAX_PIPELINED` unanswered requests on one connection get 503 at once.

mod engine;
mod exchange;
mod order;
mod prober;

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::api;
use crate::lock::lock;
use engine::{Engine, Successor};
use order::{Answer, AnswerOrder};

/// What the HTTP layer hands its requests to: the server's front door. Its methods run on
/// the HTTP layer's own threads, so none may wait for other work (a queue, a lock held
/// across I/O, the database); writing a refusal to its client is all they may block on.
pub trait Front: Send + Sync + 'static {
    /// Takes a decoded request with the means to answer it, on the thread that decoded it.
    /// Requests refused here ([`api::Request::refused`]) must be answered at once, not
    /// queued.
    fn take(&self, request: api::Request, reply: api::Reply);

    /// Whether any request is being held unanswered (parked): only then is it worth reading
    /// the kernel's socket tables for clients that went away.
    fn holding(&self) -> bool;

    /// Lets go of the held requests of clients that went away. `connected` reads the peers
    /// whose connections are open both ways now, with their sockets (`None`: unknown); it
    /// may be called twice.
    fn release_gone(&self, connected: &dyn Fn() -> Option<crate::sys::Peers>);
}

/// How long a write to a client may block before the connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Threads taking requests from each tiny_http server: one per core on a small host.
const DISPATCHERS: usize = 2;
/// Stack for our threads (dispatchers, body readers, drains, writers, the prober): they
/// hold nothing deep.
const SMALL_STACK: usize = 128 << 10;

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

/// What the HTTP layer's threads share.
struct Shared {
    listener: TcpListener,
    /// Where the prober connects to reach us: the bound address, or loopback when bound to
    /// every interface.
    self_addr: SocketAddr,
    front: Arc<dyn Front>,
    max_body: usize,
    read_timeout: Duration,
    stopping: AtomicBool,
    /// What `/proc/self/fd` shows for the listener (`socket:[inode]`), when there is a /proc.
    listener_link: Option<PathBuf>,
    engines: Mutex<Vec<Arc<Engine>>>,
    /// The accept loop to start next, while one is wanted.
    successor: Mutex<Option<Successor>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Probe requests answered so far.
    probes_answered: AtomicUsize,
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
    /// Per connection, its requests not yet answered and the answers waiting their turn.
    order: Mutex<AnswerOrder<Answer>>,
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
    /// Starts accepting on `listener`, handing every request to `front`. Connections that
    /// send nothing for `read_timeout` are cut.
    pub fn start(
        listener: TcpListener,
        limits: Limits,
        front: Arc<dyn Front>,
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
        let self_addr = reachable(addr);
        let (stop_prober, stopped) = crossbeam_channel::bounded(0);
        let shared = Arc::new(Shared {
            listener,
            self_addr,
            front,
            max_body,
            read_timeout,
            stopping: AtomicBool::new(false),
            listener_link: crate::sys::fd_link(listener_fd),
            engines: Mutex::new(Vec::new()),
            successor: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
            probes_answered: AtomicUsize::new(0),
            max_connections,
            uncapped,
            connections: AtomicUsize::new(0),
            baseline_fds: crate::sys::open_fds().unwrap_or(0),
            arrivals: AtomicUsize::new(0),
            stopped,
            order: Mutex::new(AnswerOrder::default()),
        });
        engine::spawn_dispatchers(&shared, engine::new_engine(&shared)?)?;
        let prober = shared.clone();
        let handle = spawn_small("http-prober", move || prober::run(&prober))?;
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
            let name = handle.thread().name().unwrap_or("unnamed").to_owned();
            if handle.join().is_err() {
                // Logged, not re-raised: this runs inside the server's shutdown, which must
                // still commit what is queued. The panic hook printed the message already.
                crate::log::error(&format!(
                    "the HTTP thread {name} had panicked (its message is above)"
                ));
            }
        }
    }
}

/// Keeps `handle` to join at shutdown, forgetting threads that have ended already.
fn keep_thread(shared: &Shared, handle: JoinHandle<()>) {
    let mut threads = lock(&shared.threads);
    threads.retain(|t| !t.is_finished());
    threads.push(handle);
}

/// Spawns one of our threads, all of which hold nothing deep: [`SMALL_STACK`].
fn spawn_small(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name.into())
        .stack_size(SMALL_STACK)
        .spawn(f)
}

/// Where this process reaches a server listening on `addr`: over loopback when it listens
/// on every address.
pub(crate) fn reachable(addr: SocketAddr) -> SocketAddr {
    let mut reachable = addr;
    if addr.ip().is_unspecified() {
        reachable.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    reachable
}

/// Sends `GET path` on a fresh connection to `addr` (our own server) and returns the
/// answer's first 12 bytes (`HTTP/1.1 200`), each step within `patience`. For the server's
/// checks of itself: the prober's probe requests and the systemd watchdog's health check.
pub(crate) fn ask_self(addr: SocketAddr, path: &str, patience: Duration) -> io::Result<[u8; 12]> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, patience)?;
    stream.set_read_timeout(Some(patience))?;
    stream.set_write_timeout(Some(patience))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    Ok(head)
}

/// tiny_http 0.12 behaviours the layer relies on that no test in `tests/it` shows alone.
#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    use super::*;

    /// A tiny_http server on a fresh loopback listener, and that listener's address.
    fn engine() -> (tiny_http::Server, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (
            tiny_http::Server::from_listener(listener, None).unwrap(),
            addr,
        )
    }

    #[test]
    fn tiny_http_ends_its_accept_loop_when_an_idle_accept_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        socket2::SockRef::from(&listener)
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        // We keep a handle on the listener, as `HttpServer` does; tiny_http gets a clone.
        let clone = listener.try_clone().unwrap();
        let clone_fd = clone.as_raw_fd();
        let link = crate::sys::fd_link(clone_fd).expect("/proc shows the clone");
        let server = tiny_http::Server::from_listener(clone, None).unwrap();
        // The timeout is reported once, as an error of `recv`.
        let error = server.recv_timeout(Duration::from_secs(5)).err();
        assert!(
            error.is_some_and(|e| matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )),
            "the idle accept's timeout is reported"
        );
        // The accept thread has ended: the clone it owned is closed (what `Engine::dead`
        // looks for), and a new connection, queued on our listener, is never served.
        let deadline = Instant::now() + Duration::from_secs(5);
        while crate::sys::fd_link(clone_fd).as_ref() == Some(&link) {
            assert!(Instant::now() < deadline, "the listener clone stays open");
            thread::sleep(Duration::from_millis(10));
        }
        let mut client = TcpStream::connect(addr).unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert!(matches!(
            server.recv_timeout(Duration::from_millis(300)),
            Ok(None)
        ));
    }

    #[test]
    fn tiny_http_answers_a_dropped_request_with_a_bare_500() {
        let (server, addr) = engine();
        let mut client = TcpStream::connect(addr).unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let rq = server.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(rq.expect("the request"));
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n"), "no body: {answer}");
    }

    #[test]
    fn tiny_http_cannot_count_its_connections() {
        let (server, _) = engine();
        let counted =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.num_connections()));
        assert!(counted.is_err(), "tiny_http 0.12 panics in num_connections");
    }
}
