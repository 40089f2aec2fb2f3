//! The connection engine: one mio (epoll) loop per thread driving many keep-alive HTTP/1.1
//! connections, one request at a time on each. A scenario supplies a [`Client`] that writes
//! each connection's next request and digests each response; the engine does the sockets.
//!
//! Connections are opened at a bounded rate (the server's listen backlog is finite), a
//! broken one is reopened up to a bound, and every run ends by the client's word or at a hard
//! deadline, whichever comes first.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::wire::{Parse, parse_response};

/// What a scenario does on its connections.
pub trait Client {
    /// Writes connection `conn`'s next request into `out` (empty on entry) and returns true,
    /// or returns false to leave the connection idle until [`Ctl::wake`].
    fn request(&mut self, conn: usize, out: &mut Vec<u8>, now: Instant) -> bool;
    /// A complete response to the request sent at `sent`.
    fn response(&mut self, conn: usize, status: u16, body: &[u8], sent: Instant, now: Instant);
    /// The request in flight on `conn` got no response (the connection broke); the engine
    /// reconnects and asks for a request again.
    fn failed(&mut self, conn: usize, now: Instant);
    /// Called on every turn of the loop (at least every couple of milliseconds).
    fn tick(&mut self, now: Instant, ctl: &mut Ctl);
    /// Called once when requests may start (after every connection is open, when
    /// [`Options::connect_all_first`] is set).
    fn start(&mut self, _now: Instant) {}
}

/// The engine's answer box for [`Client::tick`].
#[derive(Default)]
pub struct Ctl {
    wake: Vec<usize>,
    stop: bool,
    /// Requests written or being written and not yet answered.
    pub in_flight: usize,
    /// Connections open right now.
    pub open: usize,
}

impl Ctl {
    /// Asks for a request on an idle connection.
    pub fn wake(&mut self, conn: usize) {
        self.wake.push(conn);
    }

    /// Ends the run: every connection is closed.
    pub fn stop(&mut self) {
        self.stop = true;
    }
}

/// How the engine opens connections and how long it may run.
#[derive(Clone, Debug)]
pub struct Options {
    /// New connections per second (0: as fast as the kernel takes them).
    pub connect_rate: u32,
    /// Connection attempts in progress at once.
    pub max_connecting: usize,
    /// Open every connection before the first request.
    pub connect_all_first: bool,
    /// The run ends here whatever the client says.
    pub deadline: Instant,
    /// Reconnections allowed in the whole run.
    pub max_reconnects: usize,
    /// Close the connections still open at the end with a reset (`SO_LINGER 0`) instead of
    /// a FIN, as a killed client or a NAT timing out does.
    pub reset_at_end: bool,
}

impl Options {
    /// Defaults: 4,000 connects/s, 256 at once, requests as soon as each connection opens.
    pub fn new(deadline: Instant) -> Options {
        Options {
            connect_rate: 4_000,
            max_connecting: 256,
            connect_all_first: false,
            deadline,
            max_reconnects: 1_000,
            reset_at_end: false,
        }
    }
}

/// What happened on the transport.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Time from the start until every connection had opened once.
    pub all_open: Option<Duration>,
    /// Connections that broke (or could not open) and were retried.
    pub broken: u64,
    /// Responses that announced `Connection: close`.
    pub closed_by_server: u64,
    /// The run hit its hard deadline instead of being stopped by the client.
    pub hit_deadline: bool,
    /// The first few transport errors, for the report.
    pub first_errors: Vec<String>,
    /// CPU time this loop's thread used: the load generator's own cost, taken from the
    /// two cores the server also needs.
    pub cpu: Duration,
    /// Wall time of the whole run.
    pub wall: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Waiting,
    Connecting,
    Idle,
    Sending,
    Awaiting,
}

struct Conn {
    sock: Option<TcpStream>,
    state: State,
    out: Vec<u8>,
    written: usize,
    inbuf: Vec<u8>,
    sent: Instant,
    since: Instant,
    opened_once: bool,
}

/// Runs `client` over `n` connections on this thread until it stops, connection `i` to
/// `addrs[i % addrs.len()]` (several nodes of one database share the connections round-robin).
pub fn run<C: Client>(addrs: &[SocketAddr], n: usize, client: &mut C, opts: &Options) -> Stats {
    let mut engine = match Engine::new(addrs, n, opts.clone()) {
        Ok(e) => e,
        Err(e) => {
            return Stats {
                first_errors: vec![format!("cannot create the poller: {e}")],
                hit_deadline: true,
                ..Stats::default()
            };
        }
    };
    let cpu = thread_cpu();
    engine.run(client);
    engine.stats.wall = engine.began.elapsed();
    engine.stats.cpu = thread_cpu().saturating_sub(cpu);
    engine.stats
}

/// CPU time of the calling thread so far (Linux `schedstat`, nanoseconds on the CPU).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

struct Engine {
    addrs: Vec<SocketAddr>,
    poll: Poll,
    conns: Vec<Conn>,
    pending: VecDeque<usize>,
    connecting: usize,
    opened_once: usize,
    open: usize,
    in_flight: usize,
    started: bool,
    began: Instant,
    credit: f64,
    last_credit: Instant,
    reconnects: usize,
    last_sweep: Instant,
    scratch: Vec<u8>,
    opts: Options,
    stats: Stats,
}

impl Engine {
    fn new(addrs: &[SocketAddr], n: usize, opts: Options) -> io::Result<Engine> {
        if addrs.is_empty() {
            return Err(io::Error::other("no address to connect to"));
        }
        let now = Instant::now();
        let conns = (0..n)
            .map(|_| Conn {
                sock: None,
                state: State::Waiting,
                out: Vec::new(),
                written: 0,
                inbuf: Vec::new(),
                sent: now,
                since: now,
                opened_once: false,
            })
            .collect();
        Ok(Engine {
            addrs: addrs.to_vec(),
            poll: Poll::new()?,
            conns,
            pending: (0..n).collect(),
            connecting: 0,
            opened_once: 0,
            open: 0,
            in_flight: 0,
            started: false,
            began: now,
            credit: 16.0,
            last_credit: now,
            reconnects: 0,
            last_sweep: now,
            scratch: vec![0; 64 << 10],
            opts,
            stats: Stats::default(),
        })
    }

    fn run<C: Client>(&mut self, client: &mut C) {
        let mut events = Events::with_capacity(4096);
        let mut ctl = Ctl::default();
        if self.conns.is_empty() {
            self.started = true;
            client.start(Instant::now());
        }
        loop {
            let now = Instant::now();
            if now >= self.opts.deadline {
                self.stats.hit_deadline = true;
                break;
            }
            self.open_more(now, client);
            ctl.in_flight = self.in_flight;
            ctl.open = self.open;
            client.tick(now, &mut ctl);
            if ctl.stop {
                break;
            }
            for i in std::mem::take(&mut ctl.wake) {
                self.issue(i, client);
            }
            let timeout = self
                .opts
                .deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(2));
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                self.note(format!("poll failed: {e}"));
                break;
            }
            for event in &events {
                let i = event.token().0;
                if self.conns[i].state == State::Connecting {
                    self.check_connected(i, client);
                    continue;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read(i, client);
                }
                if event.is_writable() && self.conns[i].state == State::Sending {
                    self.write(i, client);
                }
            }
        }
        for conn in &mut self.conns {
            if let Some(mut sock) = conn.sock.take() {
                let _ = self.poll.registry().deregister(&mut sock);
                if self.opts.reset_at_end {
                    let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
                }
            }
        }
    }

    fn note(&mut self, what: String) {
        if self.stats.first_errors.len() < 5 {
            self.stats.first_errors.push(what);
        }
    }

    /// Starts connection attempts as the rate and the in-progress cap allow.
    fn open_more<C: Client>(&mut self, now: Instant, client: &mut C) {
        let rate = f64::from(self.opts.connect_rate);
        if rate > 0.0 {
            let dt = now.duration_since(self.last_credit).as_secs_f64();
            self.credit = (self.credit + dt * rate).min(rate.max(16.0) / 50.0 + 16.0);
        } else {
            self.credit = f64::MAX;
        }
        self.last_credit = now;
        while self.connecting < self.opts.max_connecting && self.credit >= 1.0 {
            let Some(i) = self.pending.pop_front() else {
                break;
            };
            self.credit -= 1.0;
            self.connect(i, now, client);
        }
        // Attempts that hang (a full backlog drops SYNs) are retried.
        if self.connecting > 0 && now.duration_since(self.last_sweep) > Duration::from_millis(200) {
            self.last_sweep = now;
            for i in 0..self.conns.len() {
                let c = &self.conns[i];
                if c.state == State::Connecting
                    && now.duration_since(c.since) > Duration::from_secs(15)
                {
                    self.broken(i, "connect timed out".into(), client);
                }
            }
        }
    }

    fn connect<C: Client>(&mut self, i: usize, now: Instant, client: &mut C) {
        let addr = self.addrs[i % self.addrs.len()];
        let result = TcpStream::connect(addr).and_then(|mut sock| {
            sock.set_nodelay(true)?;
            self.poll.registry().register(
                &mut sock,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(sock)
        });
        let conn = &mut self.conns[i];
        conn.since = now;
        conn.inbuf.clear();
        match result {
            Ok(sock) => {
                conn.sock = Some(sock);
                conn.state = State::Connecting;
                self.connecting += 1;
            }
            Err(e) => {
                conn.state = State::Waiting;
                self.broken(i, format!("connect: {e}"), client);
            }
        }
    }

    fn check_connected<C: Client>(&mut self, i: usize, client: &mut C) {
        let conn = &mut self.conns[i];
        let sock = conn.sock.as_ref().expect("connecting has a socket");
        match sock.take_error() {
            Ok(Some(e)) | Err(e) => return self.broken(i, format!("connect: {e}"), client),
            Ok(None) => {}
        }
        match sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => return self.broken(i, format!("connect: {e}"), client),
        }
        conn.state = State::Idle;
        self.connecting -= 1;
        self.open += 1;
        if !conn.opened_once {
            conn.opened_once = true;
            self.opened_once += 1;
            if self.opened_once == self.conns.len() {
                self.stats.all_open = Some(self.began.elapsed());
            }
        }
        if self.started {
            self.issue(i, client);
        } else if !self.opts.connect_all_first || self.opened_once == self.conns.len() {
            self.started = true;
            client.start(Instant::now());
            if self.opts.connect_all_first {
                for j in 0..self.conns.len() {
                    self.issue(j, client);
                }
            } else {
                self.issue(i, client);
            }
        }
    }

    /// Asks the client for a request if the connection is idle, and sends it.
    fn issue<C: Client>(&mut self, i: usize, client: &mut C) {
        if !self.started {
            return;
        }
        let conn = &mut self.conns[i];
        if conn.state != State::Idle {
            return;
        }
        conn.out.clear();
        let now = Instant::now();
        if !client.request(i, &mut conn.out, now) {
            return;
        }
        conn.state = State::Sending;
        conn.written = 0;
        conn.sent = now;
        self.in_flight += 1;
        self.write(i, client);
    }

    fn write<C: Client>(&mut self, i: usize, client: &mut C) {
        let conn = &mut self.conns[i];
        let sock = conn.sock.as_mut().expect("sending has a socket");
        while conn.written < conn.out.len() {
            match sock.write(&conn.out[conn.written..]) {
                Ok(0) => return self.broken(i, "write returned 0".into(), client),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.broken(i, format!("write: {e}"), client),
            }
        }
        conn.state = State::Awaiting;
    }

    fn read<C: Client>(&mut self, i: usize, client: &mut C) {
        let mut eof = false;
        {
            let conn = &mut self.conns[i];
            let Some(sock) = conn.sock.as_mut() else {
                return;
            };
            loop {
                match sock.read(&mut self.scratch) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => conn.inbuf.extend_from_slice(&self.scratch[..n]),
                    Err(e) => match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => {}
                        _ => return self.broken(i, format!("read: {e}"), client),
                    },
                }
            }
        }
        loop {
            let conn = &mut self.conns[i];
            if conn.inbuf.is_empty() {
                break;
            }
            match parse_response(&conn.inbuf) {
                Parse::Incomplete => break,
                Parse::Bad(why) => return self.broken(i, why, client),
                Parse::Done(p) => {
                    if !matches!(conn.state, State::Sending | State::Awaiting) {
                        return self.broken(i, "response without a request".into(), client);
                    }
                    let now = Instant::now();
                    conn.state = State::Idle;
                    self.in_flight -= 1;
                    client.response(i, p.status, p.body(&conn.inbuf), conn.sent, now);
                    let conn = &mut self.conns[i];
                    conn.inbuf.drain(..p.consumed);
                    if p.close {
                        self.stats.closed_by_server += 1;
                        self.close(i);
                        self.pending.push_back(i);
                        return;
                    }
                    self.issue(i, client);
                }
            }
        }
        if eof {
            let state = self.conns[i].state;
            if state == State::Idle && self.conns[i].inbuf.is_empty() {
                // The server closed an idle keep-alive connection: reopen quietly.
                self.close(i);
                self.pending.push_back(i);
            } else {
                self.broken(i, "server closed the connection".into(), client);
            }
        }
    }

    fn close(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        match conn.state {
            State::Connecting => self.connecting -= 1,
            State::Idle => self.open -= 1,
            State::Sending | State::Awaiting => {
                self.open -= 1;
                self.in_flight -= 1;
            }
            State::Waiting => {}
        }
        conn.state = State::Waiting;
        conn.inbuf.clear();
        if let Some(mut sock) = conn.sock.take() {
            let _ = self.poll.registry().deregister(&mut sock);
        }
    }

    /// A connection failed: tell the client about a lost request and reconnect if allowed.
    fn broken<C: Client>(&mut self, i: usize, why: String, client: &mut C) {
        let lost = matches!(self.conns[i].state, State::Sending | State::Awaiting);
        self.close(i);
        self.stats.broken += 1;
        self.note(format!("connection {i}: {why}"));
        if lost {
            client.failed(i, Instant::now());
        }
        if self.reconnects < self.opts.max_reconnects {
            self.reconnects += 1;
            self.pending.push_back(i);
        }
    }
}
