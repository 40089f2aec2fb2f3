//! Abusive clients and resource limits, and the hazards of tiny_http 0.12, each reproduced
//! against eventserver to show it contained: it has no deadline on reading a request, no
//! limit on the head's size or on pipelined read-ahead, strands some connections of a
//! burst, blocks a worker on a request pipelined behind a parked long-poll, and its accept
//! loop dies when `accept` or a thread spawn fails.
//!
//! Most tests talk to a server started in process; those that need a process of their own
//! (resource limits, memory and descriptor counts) run the real binary on a temporary
//! database, read its address from the `listening on ADDR` log line, and kill it when the
//! test ends, passing or not ([`Proc`]). Every wait has a deadline; the only sleeps are the
//! pauses of slow clients, which are the behaviour under test, and the sampling period of a
//! measurement.
//!
//! Hazards that stock tiny_http 0.12 makes impossible to contain are kept as reproducing
//! tests marked `#[ignore]`, with the figure measured here in the reason.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    BIN, PASSWORD, Proc, Req, Resp, TestServer, USER, append_ok, append_req, authed, basic, clean,
    consume_req, db_with_user, event, expect_text_starting, proc_status, publish_ok, publish_req,
    read_response, send, serve_args, tail, try_send, wait_until,
};

const SECOND: Duration = Duration::from_secs(1);
const MIB: u64 = 1 << 20;
/// `setpriv` options that make a command run as `nobody`.
const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

// ---------------------------------------------------------------------------------------
// The real binary as a child process
// ---------------------------------------------------------------------------------------

/// `wrapper… BIN serve …extra` on a database of its own with the test user, once it
/// listens; the directory holds the database.
fn start(wrapper: &[&str], extra: &[&str]) -> (Proc, SocketAddr, tempfile::TempDir) {
    let (dir, db) = db_with_user();
    let (proc, addr) = launch(&db, Path::new(BIN), wrapper, extra);
    (proc, addr, dir)
}

/// Starts the server as `nobody`, to whom per-user limits such as `RLIMIT_NPROC` apply
/// (root ignores them), from a copy of the binary in a directory that user may use.
fn start_unprivileged(extra: &[&str]) -> (Proc, SocketAddr, tempfile::TempDir) {
    assert_eq!(
        proc_status(std::process::id(), "Uid"),
        Some(0),
        "only root can run the server as another user"
    );
    let (dir, db) = db_with_user();
    let everyone = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    everyone(dir.path(), 0o777);
    everyone(&db, 0o666);
    let bin = dir.path().join("eventserver");
    std::fs::copy(BIN, &bin).expect("copy the binary");
    let wrapper: Vec<&str> = ["setpriv"].into_iter().chain(NOBODY).collect();
    let (proc, addr) = launch(&db, &bin, &wrapper, extra);
    (proc, addr, dir)
}

/// `wrapper… bin serve …extra` on `db`, once it listens.
fn launch(db: &Path, bin: &Path, wrapper: &[&str], extra: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = clean(program);
            cmd.args(args).arg("--").arg(bin);
            cmd
        }
        None => clean(bin),
    };
    cmd.args(serve_args(db, extra));
    let mut proc = Proc::spawn(cmd, None);
    let addr = proc.listening();
    (proc, addr)
}

/// Threads of every process of user `uid`, which is what `RLIMIT_NPROC` counts.
fn threads_of(uid: u64) -> u64 {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_status(pid, "Uid") == Some(uid))
        .filter_map(|pid| proc_status(pid, "Threads"))
        .sum()
}

// ---------------------------------------------------------------------------------------
// HTTP with deadlines
// ---------------------------------------------------------------------------------------

fn healthz(addr: SocketAddr) -> Req {
    Req::new(addr, "GET", "/healthz")
}

/// A consumer's read of `stream` (event name `a`).
fn read_req(addr: SocketAddr, stream: &str) -> Req {
    consume_req(addr, stream, "c", "eventName=a&limit=1000")
}

/// How long `req` takes to be answered with `status`; fails after `within`.
#[track_caller]
fn answered_within(addr: SocketAddr, req: &Req, status: u16, within: Duration) -> Duration {
    let started = Instant::now();
    let resp =
        try_send(addr, req, within).unwrap_or_else(|e| panic!("no answer within {within:?}: {e}"));
    assert_eq!(resp.status, status, "{}", resp.text());
    started.elapsed()
}

/// Spawns `n` threads running `work`, which waits once on the barrier it is given; returns
/// when all of them have reached it.
fn together<T: Send + 'static>(
    n: usize,
    work: impl Fn(&Barrier) -> T + Clone + Send + 'static,
) -> Vec<JoinHandle<T>> {
    let barrier = Arc::new(Barrier::new(n + 1));
    let handles = (0..n)
        .map(|_| {
            let (barrier, work) = (barrier.clone(), work.clone());
            thread::spawn(move || work(&barrier))
        })
        .collect();
    barrier.wait();
    handles
}

/// Whether the peer closed (or reset) the connection within `within`; `false` if it is
/// still open then. Data the server sends first counts as not closed.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
        ),
    }
}

/// The value of `eventserver_http_requests_total{route, status}` from `/metrics`, or
/// `None` when the scrape is not answered within a second.
fn requests_total(addr: SocketAddr, route: &str, status: u16) -> Option<u64> {
    let key = format!("eventserver_http_requests_total{{route=\"{route}\",status=\"{status}\"}}");
    metric(addr, &key)
}

/// The value of the sample `key` (its name and labels) from `/metrics`: 0 when it is
/// absent, `None` when the scrape is not answered within a second.
fn metric(addr: SocketAddr, key: &str) -> Option<u64> {
    let resp = try_send(addr, &authed(addr, "GET", "/metrics"), SECOND).ok()?;
    Some(
        resp.text()
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    )
}

// ---------------------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------------------

/// Many connections sending their heads a byte at a time, pausing longer than the read
/// timeout: each is cut after the timeout, and meanwhile fresh connections are answered at
/// once (all but one, on a loaded host). Two rounds of 50, since how the slow ones land in
/// tiny_http's pool varies.
#[test]
fn slow_heads_are_cut_while_fresh_connections_are_served() {
    let _turn = crate::support::heavy();
    let server = TestServer::start_with(|c| c.read_timeout = SECOND);
    let addr = server.addr;
    const SLOW: usize = 50;
    let head = b"GET /healthz HTTP/1.1\r\nHost: slow\r\n\r\n";
    let (mut failures, mut waited) = (Vec::new(), Vec::new());
    for round in 0..2 {
        let slow = together(SLOW, move |ready| -> Result<Duration, String> {
            let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            ready.wait();
            for (i, byte) in head.iter().enumerate() {
                stream.write_all(&[*byte]).map_err(|e| e.to_string())?;
                let sent = Instant::now();
                // The pause: 3 × the read timeout. A head can wait in tiny_http's
                // pool before a thread reads it (its stranding race; the prober
                // pumps it loose), and its timeout starts only then.
                if closed_within(&mut stream, SECOND * 3) {
                    return if i == 0 {
                        Ok(sent.elapsed())
                    } else {
                        Err(format!("cut only after {} pauses", i + 1))
                    };
                }
            }
            Err("the whole head went through".into())
        });
        // While the slow ones hang on, fresh connections are answered at once. One of them,
        // in both rounds together, may wait on a loaded host (CI runs other tests beside
        // this one); were the slow heads holding the threads, each round's first would.
        let window = Instant::now();
        while window.elapsed() < SECOND {
            let sent = Instant::now();
            match try_send(addr, &healthz(addr), SECOND * 2) {
                Ok(resp) if resp.status == 200 => {
                    let took = sent.elapsed();
                    if took >= Duration::from_millis(500) {
                        waited.push(format!("round {round}: {took:?}"));
                    }
                }
                other => failures.push(format!(
                    "round {round}: a fresh request got no answer within 2 s: {other:?}"
                )),
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut late = Vec::new();
        for handle in slow {
            match handle.join().unwrap() {
                Ok(after) if after >= SECOND.mul_f32(0.8) && after < SECOND * 3 => {}
                Ok(after) => late.push(format!("cut {after:?} after its byte")),
                Err(e) => late.push(e),
            }
        }
        if !late.is_empty() {
            failures.push(format!(
                "round {round}: {} of {SLOW} slow heads were not cut after the 1 s read timeout: {:?}",
                late.len(),
                &late[..late.len().min(3)]
            ));
        }
    }
    if waited.len() > 1 {
        failures.push(format!("fresh requests waited 500 ms or more: {waited:?}"));
    }
    answered_within(addr, &healthz(addr), 200, SECOND);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A head dripped faster than the read timeout is never idle long enough to be cut.
#[test]
#[ignore = "stock tiny_http 0.12 reads the request head itself, with no deadline of its own: \
            SO_RCVTIMEO bounds each read, not the head, and eventserver sees no connection \
            before its head is complete. Measured: a head dripped at one byte per 400 ms (read \
            timeout 1 s) was still connected after 3.3 s, holding a thread and two descriptors"]
fn a_head_dripped_faster_than_the_read_timeout_is_cut_in_bounded_time() {
    let server = TestServer::start_with(|c| c.read_timeout = SECOND);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let started = Instant::now();
    for byte in b"GET /healthz HTTP/1.1\r\nX-Drip: ".iter().cycle() {
        if stream.write_all(&[*byte]).is_err()
            || closed_within(&mut stream, Duration::from_millis(400))
        {
            break;
        }
        assert!(
            started.elapsed() < SECOND * 3,
            "a dripping head is still connected after {:?}",
            started.elapsed()
        );
    }
}

/// Bodies that never finish are cut after the read timeout, whichever way they are framed,
/// while other clients are served; nothing of them is stored.
#[test]
fn a_body_that_never_finishes_is_cut_after_the_read_timeout() {
    let server = TestServer::start_with(|c| c.read_timeout = SECOND);
    let addr = server.addr;
    let path = "/api/v1/streams/stalled/events";
    let start = |head: String, body: &[u8]| {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        (stream, Instant::now())
    };
    let auth = basic(USER, PASSWORD);
    let head = |framing: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nX-Producer-ID: p\r\n\
             {framing}\r\n\r\n"
        )
    };
    let part = br#"{"event":{"name":"a"},"payload":""#;
    // Over 1 KiB declared: eventserver reads the body on a thread of its own.
    let (large, large_at) = start(head("Content-Length: 100000"), part);
    // Up to 1 KiB declared: tiny_http reads it before handing the request over.
    let (small, small_at) = start(head("Content-Length: 1000"), part);
    // Chunked, stalled inside a chunk.
    let (chunked, chunked_at) = start(
        head("Transfer-Encoding: chunked"),
        &[b"ffff\r\n".as_slice(), part].concat(),
    );
    // Others are served at once meanwhile.
    let mut slowest = Duration::ZERO;
    while large_at.elapsed() < SECOND.mul_f32(0.8) {
        slowest = slowest.max(answered_within(addr, &healthz(addr), 200, SECOND));
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?}"
    );
    for (what, stream, at) in [("large", large, large_at), ("chunked", chunked, chunked_at)] {
        stream.set_read_timeout(Some(SECOND * 3)).unwrap();
        let resp = read_response(&mut BufReader::new(stream))
            .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        let took = at.elapsed();
        assert_eq!(resp.status, 400, "{what}: {}", resp.text());
        assert_eq!(
            resp.json(),
            json!("Bad Request - could not read the request body"),
            "{what}"
        );
        assert!(
            took >= SECOND.mul_f32(0.8) && took < SECOND * 3,
            "{what}: answered after {took:?}"
        );
    }
    let mut small = small;
    assert!(
        closed_within(&mut small, SECOND * 3),
        "the small stalled body was not cut"
    );
    assert!(small_at.elapsed() >= SECOND.mul_f32(0.8));
    let resp = send(addr, read_req(addr, "stalled"));
    assert_eq!(
        resp.status,
        404,
        "a stalled body was stored: {}",
        resp.text()
    );
}

// ---------------------------------------------------------------------------------------
// Bursts and pipelining
// ---------------------------------------------------------------------------------------

/// A burst of 300 new connections, each sending one request: all answered within 2 s
/// (tiny_http's pool race strands some of them until another connection closes).
#[test]
fn a_burst_of_300_connections_is_answered_within_2_s() {
    let _turn = crate::support::heavy();
    let server = TestServer::start();
    let addr = server.addr;
    append_ok(addr, "burst", "p", &event("a"));
    // Warm the credential cache, so the burst measures the HTTP engine, not argon2.
    assert_eq!(send(addr, read_req(addr, "burst")).status, 200);
    const N: usize = 300;
    for round in 0..2 {
        let handles = together(N, move |go| -> Result<Instant, String> {
            go.wait();
            let resp = try_send(addr, &read_req(addr, "burst"), Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            if resp.status != 200 {
                return Err(format!("{} {}", resp.status, resp.text()));
            }
            Ok(Instant::now())
        });
        let started = Instant::now();
        let mut last = Duration::ZERO;
        for handle in handles {
            let done = handle
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            last = last.max(done.duration_since(started));
        }
        assert!(
            last <= Duration::from_secs(2),
            "round {round}: the last of {N} answers came after {last:?}"
        );
    }
}

/// A request pipelined behind a parked long-poll on the same connection: the only worker
/// stays free for others, and both answers arrive in order once the poll is answered.
#[test]
fn a_request_pipelined_behind_a_parked_long_poll_leaves_the_worker_free() {
    let server = TestServer::start_with(|c| c.workers = 1);
    let addr = server.addr;
    append_ok(addr, "s", "p", &event("a"));
    let before = requests_total(addr, "streams", 200).expect("metrics answer");
    let auth = basic(USER, PASSWORD);
    let pipelined = format!(
        "GET /events?category=x&timeout=5 HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n\
         GET /api/v1/streams/s/events?eventName=a&limit=1 HTTP/1.1\r\nHost: p\r\n\
         Authorization: {auth}\r\nX-Consumer-ID: c\r\nConnection: close\r\n\r\n"
    );
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(pipelined.as_bytes()).unwrap();
    let started = Instant::now();
    wait_until(Duration::from_secs(2), "the long-poll parks", || {
        server.handle().parked() == 1
    });
    // The worker took the pipelined read and answered it (the metric counts an answer once
    // the worker has handed it over); each scrape needs that worker too.
    wait_until(
        Duration::from_secs(3),
        "the pipelined read is answered",
        || requests_total(addr, "streams", 200).is_some_and(|n| n > before),
    );
    let took = answered_within(addr, &read_req(addr, "s"), 200, SECOND);
    assert!(
        took < Duration::from_millis(500),
        "another client waited {took:?}"
    );
    // The pipelined answer waits for the poll's, which is not there yet.
    conn.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(conn.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "an answer arrived before the poll was answered"
    );
    conn.set_nonblocking(false).unwrap();
    assert_eq!(
        send(addr, publish_req(addr, "x", &json!({"n": 1}))).status,
        200
    );
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut reader = BufReader::new(conn);
    let first = read_response(&mut reader).expect("the poll's answer");
    let second = read_response(&mut reader).expect("the pipelined answer");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the poll timed out instead"
    );
    assert_eq!(first.status, 200);
    let events = first.json()["events"].clone();
    assert_eq!(events[0]["category"], "x", "first: {}", first.text());
    assert_eq!(events[0]["data"], json!({"n": 1}));
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(
        second.json()[0]["event"]["name"],
        "a",
        "second: {}",
        second.text()
    );
}

/// Long-polls pipelined on one connection are all answered when they time out.
/// tiny_http writes a connection's answers only in the order it read the requests; the
/// server numbered them in the order its two dispatch threads got round to them, which
/// could differ, and then held an answer back behind one tiny_http would never write
/// (before the fix, about one connection in six stopped after a few answers, and the
/// server could not shut down).
#[test]
fn pipelined_long_polls_are_all_answered_in_order() {
    let server = TestServer::start();
    let addr = server.addr;
    const POLLS: usize = 40;
    let clients: Vec<_> = (0..12)
        .map(|client| {
            thread::spawn(move || {
                // Keep-alive requests (Req::bytes asks for Connection: close).
                let one = format!(
                    "GET /events?category=p{client}&timeout=1 HTTP/1.1\r\nHost: p\r\n\
                     Authorization: {}\r\n\r\n",
                    basic(USER, PASSWORD)
                );
                let mut conn = TcpStream::connect(addr).unwrap();
                conn.write_all(one.repeat(POLLS).as_bytes()).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut reader = BufReader::new(conn);
                (0..POLLS)
                    .map(|i| {
                        let resp = read_response(&mut reader).unwrap_or_else(|e| {
                            panic!("client {client}: answer {i} of {POLLS} missing: {e}")
                        });
                        assert_eq!(resp.status, 200, "{}", resp.text());
                        assert!(resp.json()["timeout"].is_string(), "{}", resp.text());
                    })
                    .count()
            })
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().expect("every answer arrived"), POLLS);
    }
}

/// A client that pipelines reads and never takes the answers holds one worker at most:
/// its answers wait behind the one being written instead of each blocking a worker inside
/// tiny_http, so with two workers everyone else is still served.
#[test]
fn a_client_that_never_reads_its_answers_holds_one_worker_at_most() {
    let server = TestServer::start_with(|c| c.workers = 2);
    let addr = server.addr;
    let blob = "x".repeat(900_000);
    for _ in 0..4 {
        let event = json!({"event": {"name": "a", "data": {"blob": blob}}});
        let resp = send(addr, append_req(addr, "big", "p", &event));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    append_ok(addr, "small", "p", &event("a"));
    // 60 answers of 3.6 MB each: far more than the socket buffers hold.
    let one = format!(
        "GET /api/v1/streams/big/events?eventName=a&limit=4 HTTP/1.1\r\nHost: p\r\n\
         Authorization: {}\r\nX-Consumer-ID: c\r\n\r\n",
        basic(USER, PASSWORD)
    );
    let mut hog = TcpStream::connect(addr).unwrap();
    hog.write_all(one.repeat(60).as_bytes()).unwrap();
    let until = Instant::now() + SECOND * 4;
    while Instant::now() < until {
        let took = answered_within(addr, &read_req(addr, "small"), 200, SECOND * 2);
        assert!(took < SECOND, "another client waited {took:?}");
    }
    drop(hog);
}

/// Floods one connection with pipelined requests it never reads the answers to, and
/// samples the server for `watch`. Returns (peak extra threads, peak RSS growth in MiB,
/// whether the server died, the slowest fresh request or `None` when one went unanswered).
fn pipelining_flood(
    proc: &mut Proc,
    addr: SocketAddr,
    requests: usize,
    watch: Duration,
    stop_when_stalled: bool,
) -> Flood {
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    let threads = proc.status("Threads");
    let rss = proc.rss_mib();
    let mut flood = TcpStream::connect(addr).unwrap();
    let one = b"GET /nope HTTP/1.1\r\nHost: flood\r\n\r\n";
    let all: Vec<u8> = one.repeat(requests);
    flood.set_write_timeout(Some(SECOND * 5)).unwrap();
    let sent = flood.write_all(&all).is_ok();
    let mut out = Flood {
        sent,
        extra_threads: 0,
        rss_growth_mib: 0.0,
        died: false,
        slowest_fresh: Some(Duration::ZERO),
    };
    let started = Instant::now();
    while started.elapsed() < watch {
        if !proc.alive() {
            out.died = true;
            break;
        }
        out.extra_threads = out
            .extra_threads
            .max(proc.status("Threads").saturating_sub(threads));
        out.rss_growth_mib = out.rss_growth_mib.max(proc.rss_mib() - rss);
        let fresh = Instant::now();
        out.slowest_fresh = match (
            out.slowest_fresh,
            try_send(addr, &healthz(addr), SECOND * 2),
        ) {
            (Some(slowest), Ok(resp)) if resp.status == 200 => Some(slowest.max(fresh.elapsed())),
            _ => None,
        };
        let stalled = out.slowest_fresh.is_none() && stop_when_stalled;
        if stalled || out.extra_threads > 2_000 || out.rss_growth_mib > 256.0 {
            // Enough evidence; stop before the machine suffers.
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    out.died |= !proc.alive();
    drop(flood);
    out
}

#[derive(Debug)]
#[allow(dead_code)] // printed in failure messages
struct Flood {
    sent: bool,
    extra_threads: u64,
    rss_growth_mib: f64,
    died: bool,
    slowest_fresh: Option<Duration>,
}

/// A client pipelining 100,000 requests (3.4 MB) without ever reading an answer must not
/// take the server down or stop it from serving others.
#[test]
fn a_pipelining_flood_does_not_take_the_server_down() {
    let _turn = crate::support::heavy();
    let (mut proc, addr, _dir) = start(&[], &[]);
    let flood = pipelining_flood(&mut proc, addr, 100_000, Duration::from_secs(4), true);
    assert!(
        !flood.died,
        "the server died: {flood:?}\n{}",
        tail(&proc.stderr())
    );
    assert!(
        flood
            .slowest_fresh
            .is_some_and(|d| d < Duration::from_secs(1)),
        "other clients were not served promptly during the flood: {flood:?}"
    );
    assert!(
        flood.extra_threads < 100,
        "the flood cost {} threads: {flood:?}",
        flood.extra_threads
    );
}

/// The flood's memory: tiny_http reads pipelined requests ahead without limit.
#[test]
#[ignore = "stock tiny_http 0.12 reads pipelined requests ahead without limit and keeps each \
            until its answer is written, which a client that never reads prevents; eventserver \
            cannot stop the reading short of closing the connection, which tiny_http does not \
            let it do (tiny_http alone grows by about 425 MB for 400,000 of them). Measured \
            here: 100,000 pipelined requests (3.4 MB) grew RSS by 200-250 MiB within 3 s, most \
            of it the 6,000-7,600 threads eventserver spawns for the answers (a bug of its own, \
            see a_pipelining_flood_does_not_take_the_server_down)"]
fn unbounded_pipelining_keeps_memory_bounded() {
    let _turn = crate::support::heavy();
    let (mut proc, addr, _dir) = start(&[], &[]);
    let flood = pipelining_flood(&mut proc, addr, 100_000, Duration::from_secs(4), false);
    println!("{flood:?}");
    assert!(
        flood.rss_growth_mib < 64.0,
        "RSS grew by {:.0} MiB: {flood:?}",
        flood.rss_growth_mib
    );
}

// ---------------------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------------------

/// A handler that panics answers 500, and the pool never shrinks: ten panics with two
/// workers, then ordinary requests, two parked long-polls and a third request all work.
/// The panicking route exists only in builds with the `test-panic-route` feature, which
/// the tests' dev-dependency on this crate turns on.
#[test]
fn a_panicking_handler_answers_500_and_the_pool_never_shrinks() {
    let server = TestServer::start_with(|c| c.workers = 2);
    let addr = server.addr;
    let panics: Vec<JoinHandle<Resp>> = (0..10)
        .map(|_| thread::spawn(move || send(addr, Req::new(addr, "GET", "/.eventserver-panic"))))
        .collect();
    for handle in panics {
        let resp = handle.join().unwrap();
        assert_eq!(resp.status, 500, "{}", resp.text());
        expect_text_starting(&resp, "Internal Server Error");
    }
    append_ok(addr, "after-panics", "p", &event("a"));
    assert_eq!(send(addr, read_req(addr, "after-panics")).status, 200);
    let polls: Vec<JoinHandle<Resp>> = ["p1", "p2"]
        .into_iter()
        .map(|category| {
            thread::spawn(move || {
                send(
                    addr,
                    authed(
                        addr,
                        "GET",
                        &format!("/events?category={category}&timeout=5"),
                    ),
                )
            })
        })
        .collect();
    wait_until(Duration::from_secs(3), "two parked polls", || {
        server.handle().parked() == 2
    });
    let took = answered_within(addr, &read_req(addr, "after-panics"), 200, SECOND);
    assert!(
        took < Duration::from_millis(500),
        "a third request took {took:?}"
    );
    let published = Instant::now();
    for category in ["p1", "p2"] {
        assert_eq!(
            send(addr, publish_req(addr, category, &json!(category))).status,
            200
        );
    }
    for (poll, category) in polls.into_iter().zip(["p1", "p2"]) {
        let resp = poll.join().unwrap();
        assert_eq!(resp.json()["events"][0]["data"], json!(category));
    }
    assert!(published.elapsed() < Duration::from_secs(2));
}

// ---------------------------------------------------------------------------------------
// Descriptors, disk, memory
// ---------------------------------------------------------------------------------------

/// A client that resets its connection while its poll is parked (`SO_LINGER 0`, as a killed
/// process or a NAT timing out does) gives up its place under the parked-poll cap within
/// seconds, and the server every descriptor it held for it. The bug: only connections in
/// `CLOSE_WAIT` were looked for, and the kernel drops a reset socket from its table, so
/// such a poll was held until its deadline (up to 110 s). Clients still connected keep
/// waiting.
#[test]
fn a_poll_whose_client_resets_is_released_with_its_descriptors() {
    const RESETS: u64 = 40;
    const STAYS: u64 = 5;
    // Descriptors that come and go besides the polls': the prober's connections, a scrape.
    const SLACK: usize = 8;
    let (proc, addr, _dir) = start(&[], &[]);
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    let idle_fds = proc.fds();
    let poll = |category: &str| {
        let mut stream = TcpStream::connect(addr).expect("connect");
        let req = authed(
            addr,
            "GET",
            &format!("/events?category={category}&timeout=100"),
        );
        stream.write_all(&req.bytes()).expect("send the poll");
        stream
    };
    let resetting: Vec<TcpStream> = (0..RESETS).map(|_| poll("resets")).collect();
    let staying: Vec<TcpStream> = (0..STAYS).map(|_| poll("stays")).collect();
    let parked = || metric(addr, "eventserver_longpoll_parked");
    wait_until(SECOND * 10, "every poll parked", || {
        parked() == Some(RESETS + STAYS)
    });
    for stream in resetting {
        // Dropped with a zero linger: the kernel sends a reset instead of a FIN.
        socket2::Socket::from(stream)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER");
    }
    wait_until(SECOND * 15, "the reset clients' polls released", || {
        parked() == Some(STAYS)
    });
    // tiny_http holds two descriptors per connection; only the staying ones' are left.
    wait_until(
        SECOND * 5,
        "the reset connections' descriptors closed",
        || proc.fds() <= idle_fds + 2 * STAYS as usize + SLACK,
    );
    publish_ok(addr, "stays", &json!("still here"));
    for stream in staying {
        stream.set_read_timeout(Some(SECOND * 5)).unwrap();
        let resp = read_response(&mut BufReader::new(stream)).expect("the event");
        assert_eq!(resp.json()["events"][0]["data"], json!("still here"));
    }
}

/// At the open-files limit `accept()` fails with EMFILE, which ends tiny_http's accept
/// loop for good; eventserver replaces it and serves again once descriptors free up.
#[test]
fn the_accept_loop_survives_emfile_and_recovers() {
    let _turn = crate::support::heavy();
    let (proc, addr, _dir) = start(&["prlimit", "--nofile=64:64"], &["--workers", "2"]);
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    // Idle connections until the descriptors run out (two per accepted connection).
    let idle: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(addr).expect("the kernel queues the connection"))
        .collect();
    wait_until(Duration::from_secs(5), "the accept loop fails", || {
        let log = proc.stderr();
        log.contains("accept loop stopped") || log.contains("probe requests go unanswered")
    });
    assert!(
        proc.fds() >= 60,
        "only {} descriptors in use: the limit was not reached",
        proc.fds()
    );
    serves_again_on_a_new_accept_loop(&proc, addr, idle);
}

/// When tiny_http cannot spawn a thread for a new connection, its accept thread panics
/// silently; eventserver notices, replaces it (retrying while threads are short) and serves
/// again once threads free up. Run as `nobody`, since root ignores `RLIMIT_NPROC`.
#[test]
#[ignore = "needs root (to run the server as nobody); .ci/run runs it"]
fn the_accept_loop_survives_a_failed_thread_spawn() {
    let _turn = crate::support::heavy();
    let (proc, addr, _dir) = start_unprivileged(&["--workers", "2"]);
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    // Room for a few threads more, not for one per connection. The limit counts every
    // thread of the user, so it is set on the running process from that count, by the same
    // user (root here may lack CAP_SYS_RESOURCE over other users' processes).
    let limit = threads_of(65534) + 16;
    let status = Command::new("setpriv")
        .args(NOBODY)
        .args(["--", "prlimit"])
        .arg(format!("--pid={}", proc.pid()))
        .arg(format!("--nproc={limit}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(addr).expect("the kernel queues the connection"))
        .collect();
    wait_until(Duration::from_secs(5), "the accept loop dies", || {
        proc.stderr().contains("the HTTP accept loop stopped")
    });
    serves_again_on_a_new_accept_loop(&proc, addr, idle);
}

/// Closes the connections that exhausted a resource; then `proc` must serve again within
/// 5 s, steadily, and have logged starting a new accept loop.
fn serves_again_on_a_new_accept_loop(proc: &Proc, addr: SocketAddr, idle: Vec<TcpStream>) {
    drop(idle);
    let freed = Instant::now();
    wait_until(Duration::from_secs(5), "the server serves again", || {
        try_send(addr, &healthz(addr), Duration::from_millis(500)).is_ok_and(|r| r.status == 200)
    });
    eprintln!(
        "served again {:?} after the connections closed",
        freed.elapsed()
    );
    for _ in 0..5 {
        answered_within(addr, &healthz(addr), 200, SECOND);
    }
    let log = proc.stderr();
    assert!(
        log.contains("a new HTTP accept loop is running"),
        "no replacement logged:\n{}",
        tail(&log)
    );
}

/// The self-probe's path is no back door: a request there with a body (here one declared
/// at 100 GB, which tiny_http would allocate whole to drain after an answer) is handled like
/// any other, and the server lives on.
#[test]
fn the_probe_path_takes_no_body() {
    let (_proc, addr, _dir) = start(&[], &[]);
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(
        b"POST /.eventserver-probe HTTP/1.1\r\nHost: p\r\nContent-Length: 100000000000\r\n\r\nx",
    )
    .unwrap();
    conn.set_read_timeout(Some(SECOND * 5)).unwrap();
    let resp = read_response(&mut BufReader::new(&conn)).expect("an answer");
    assert_eq!(resp.status, 404, "{}", resp.text());
    for _ in 0..3 {
        answered_within(addr, &healthz(addr), 200, SECOND * 5);
    }
    drop(conn);
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
}

/// A request framed two ways is answered 400 and its connection given up: the bytes after
/// it are never read as a request (with `Transfer-Encoding` and `Content-Length` together,
/// tiny_http reads the chunked body, and a proxy trusting the length would not).
#[test]
fn a_request_framed_two_ways_smuggles_nothing() {
    let server = TestServer::start();
    let smuggled = "GET /nothing-here HTTP/1.1\r\nHost: p\r\n\r\n";
    let mut conn = TcpStream::connect(server.addr).unwrap();
    conn.write_all(
        format!(
            "POST /publish HTTP/1.1\r\nHost: p\r\nAuthorization: {}\r\n\
             Transfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n0\r\n\r\n{smuggled}",
            basic(USER, PASSWORD),
            5 + smuggled.len()
        )
        .as_bytes(),
    )
    .unwrap();
    conn.set_read_timeout(Some(SECOND * 2)).unwrap();
    let mut reader = BufReader::new(&conn);
    let first = read_response(&mut reader).expect("an answer");
    assert_eq!(first.status, 400, "{}", first.text());
    match read_response(&mut reader) {
        Ok(second) => panic!("the smuggled request was answered {}", second.status),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                || e.to_string().contains("bad status line"),
            "{e}"
        ),
    }
}

/// Health checks need no credentials and go ahead of reads, so only a few are admitted at
/// once: with the writer stuck (another process holds the write lock), the ones beyond the
/// first few are refused at once instead of piling up in the writes lane.
#[test]
fn health_checks_beyond_a_few_at_once_are_refused() {
    let server = TestServer::start();
    let addr = server.addr;
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    let lock = rusqlite::Connection::open(&server.db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let checks: Vec<_> = (0..16)
        .map(|_| thread::spawn(move || try_send(addr, &healthz(addr), SECOND * 2)))
        .collect();
    let refused = checks
        .into_iter()
        .filter_map(|check| check.join().unwrap().ok())
        .filter(|resp| resp.status == 503)
        .inspect(|resp| {
            assert_eq!(
                resp.json(),
                json!("Service Unavailable - too many health checks at once")
            )
        })
        .count();
    assert!(refused >= 8, "only {refused} of 16 checks were refused");
    lock.execute_batch("ROLLBACK").unwrap();
    wait_until(Duration::from_secs(15), "health checks pass again", || {
        try_send(addr, &healthz(addr), SECOND).is_ok_and(|r| r.status == 200)
    });
}

/// Beyond `--max-connections`, new requests are answered 503 at once (the accept loop keeps
/// running), and served again once connections close. The health check alone is still
/// served: systemd's watchdog would otherwise restart a server that is only busy.
#[test]
fn connections_beyond_the_cap_get_503_quickly() {
    let _turn = crate::support::heavy();
    let (_proc, addr, _dir) = start(&[], &["--max-connections", "20"]);
    // Any request but the health check; it is answered 404 when served.
    let other = || Req::new(addr, "GET", "/nothing-here");
    answered_within(addr, &other(), 404, SECOND * 5);
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    wait_until(Duration::from_secs(5), "requests are refused", || {
        try_send(addr, &other(), SECOND).is_ok_and(|r| r.status == 503)
    });
    let sent = Instant::now();
    let resp = try_send(addr, &other(), SECOND).expect("an answer");
    assert!(
        sent.elapsed() < SECOND,
        "refused after {:?}",
        sent.elapsed()
    );
    assert_eq!(resp.status, 503);
    assert_eq!(
        resp.json(),
        json!("Service Unavailable - too many open connections")
    );
    // On the long-poll paths the refusal is in golongpoll's shape.
    for (method, path) in [
        ("GET", "/events?category=c&timeout=5"),
        ("POST", "/publish"),
    ] {
        let resp = try_send(addr, &Req::new(addr, method, path), SECOND).expect("an answer");
        assert_eq!(resp.status, 503, "{path}");
        assert_eq!(
            resp.json(),
            json!({"error": "Service Unavailable - too many open connections"}),
            "{path}"
        );
    }
    for path in ["/healthz", "/api/v1/health"] {
        let resp = try_send(addr, &Req::new(addr, "GET", path), SECOND * 5).expect("an answer");
        assert_eq!(resp.status, 200, "{path} beyond the cap: {}", resp.text());
    }
    drop(idle);
    wait_until(Duration::from_secs(5), "the server serves again", || {
        try_send(addr, &other(), SECOND).is_ok_and(|r| r.status == 404)
    });
}

/// With `RLIMIT_FSIZE` reached (SIGXFSZ ignored, so writes fail with EFBIG): appends answer
/// 500, publishes 500 `{"error": …}`, reads keep working, nothing is half-written, the writer
/// goes on with a new connection rather than the one whose write failed, and once the limit
/// is raised on the running process, writes succeed again by themselves.
#[test]
fn a_full_disk_fails_writes_cleanly_and_they_resume_when_space_returns() {
    let _turn = crate::support::heavy();
    let (mut proc, addr, dir) = start(
        &["prlimit", "--fsize=262144:unlimited"],
        &["--workers", "2"],
    );
    let filler = "x".repeat(8 * 1024);
    let event = |n: u64| json!({"event": {"name": "a"}, "payload": {"n": n, "filler": filler}});
    let mut stored: Vec<u64> = Vec::new();
    let mut failed: Vec<u64> = Vec::new();
    for n in 0..200 {
        let resp = send(addr, append_req(addr, "full", "p", &event(n)));
        match resp.status {
            200 => stored.push(n),
            500 => {
                assert_eq!(
                    resp.json(),
                    json!("Internal Server Error - could not store the event"),
                    "{}",
                    resp.text()
                );
                failed.push(n);
                break;
            }
            other => panic!("append {n}: {other} {}", resp.text()),
        }
    }
    println!(
        "{} appends of 8 KiB fitted under a 256 KiB file-size limit; append {:?} failed",
        stored.len(),
        failed
    );
    assert!(!stored.is_empty(), "not one append fitted under the limit");
    assert!(
        !failed.is_empty(),
        "200 appends of 8 KiB fitted in 256 KiB?"
    );
    proc.wait_stderr(
        "reopened the write connection after a disk failure",
        Duration::from_secs(5),
    );
    // Writes keep failing cleanly while the limit holds.
    for n in 1000..1003 {
        let resp = send(addr, append_req(addr, "full", "p", &event(n)));
        assert_eq!(resp.status, 500, "append {n}: {}", resp.text());
        failed.push(n);
    }
    let resp = send(
        addr,
        publish_req(addr, "full-publish", &json!({"filler": filler})),
    );
    assert_eq!(resp.status, 500, "{}", resp.text());
    assert_eq!(
        resp.json(),
        json!({"error": "Internal Server Error - could not store the event"})
    );
    // Reads keep working and show exactly what was acknowledged.
    let ns = |elements: &Value| -> Vec<u64> {
        elements
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["payload"]["n"].as_u64().unwrap())
            .collect()
    };
    let read = send(addr, read_req(addr, "full"));
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(ns(&read.json()), stored);
    let polled = send(
        addr,
        authed(addr, "GET", "/events?category=full&timeout=1&since_time=0"),
    );
    assert_eq!(
        polled.json()["events"].as_array().map(Vec::len),
        Some(stored.len())
    );
    // Space returns: raise the limit of the running process.
    let raised = Command::new("prlimit")
        .args(["--pid", &proc.pid().to_string(), "--fsize=unlimited"])
        .status()
        .expect("run prlimit");
    assert!(raised.success());
    let mut n = 2000;
    wait_until(Duration::from_secs(5), "appends succeed again", || {
        n += 1;
        let resp = send(addr, append_req(addr, "full", "p", &event(n)));
        if resp.status == 200 {
            stored.push(n);
            true
        } else {
            failed.push(n);
            false
        }
    });
    for n in 3000..3003 {
        assert_eq!(
            send(addr, append_req(addr, "full", "p", &event(n))).status,
            200
        );
        stored.push(n);
    }
    let resp = send(addr, publish_req(addr, "full-publish", &json!(1)));
    assert_eq!(resp.status, 200, "{}", resp.text());
    // Nothing half-written: exactly the acknowledged events, gapless, in order.
    let read = send(addr, read_req(addr, "full"));
    let elements = read.json();
    assert_eq!(ns(&elements), stored, "failed appends: {failed:?}");
    let sequences: Vec<u64> = elements
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, (1..=stored.len() as u64).collect::<Vec<_>>());
    assert_eq!(integrity_check(&dir.path().join("events.db")), "ok");
}

/// `PRAGMA integrity_check` on the database, read-only beside the running server.
fn integrity_check(db: &Path) -> String {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the database");
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

/// A 64 MiB header line: tiny_http buffers a head whole, with no limit.
#[test]
#[ignore = "stock tiny_http 0.12 has no limit on the request head and buffers it whole before \
            eventserver sees the request. Measured here: one 64 MiB header line grew the \
            server's peak RSS (VmHWM) by 128 MiB (the request was then answered 200)"]
fn a_64_mib_header_line_keeps_memory_bounded() {
    let _turn = crate::support::heavy();
    let (proc, addr, _dir) = start(&[], &[]);
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    let peak = proc.status("VmHWM");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let sending = thread::spawn(move || {
        let mut ok = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: big\r\nX-Big: ")
            .is_ok();
        let chunk = vec![b'a'; MIB as usize];
        for _ in 0..64 {
            ok = ok && stream.write_all(&chunk).is_ok();
        }
        ok = ok && stream.write_all(b"\r\nConnection: close\r\n\r\n").is_ok();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        (
            ok,
            read_response(&mut BufReader::new(stream))
                .map(|r| r.status)
                .ok(),
        )
    });
    let outcome = sending.join().unwrap();
    let growth = proc.status("VmHWM").saturating_sub(peak) as f64 / 1024.0;
    println!("64 MiB header line: {outcome:?}, peak RSS +{growth:.0} MiB");
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    assert!(growth < 16.0, "peak RSS grew by {growth:.0} MiB");
}

/// Thread stacks: the binary restarts itself with `RUST_MIN_STACK=65536`, so 2,000 idle
/// keep-alive connections (a tiny_http thread each) reserve far less than a gigabyte.
#[test]
fn two_thousand_idle_connections_reserve_well_under_a_gigabyte() {
    let _turn = crate::support::heavy();
    let (proc, addr, _dir) = start(&[], &[]);
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    let threads = proc.status("Threads");
    const N: usize = 2_000;
    let one = b"GET /nope HTTP/1.1\r\nHost: idle\r\n\r\n";
    let mut conns: Vec<TcpStream> = (0..N)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(one).unwrap();
            c
        })
        .collect();
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let resp = read_response(&mut BufReader::new(&*c)).expect("an answer");
        assert_eq!(resp.status, 404);
    }
    // Each connection holds a tiny_http thread (the pool's idle ones are taken first).
    wait_until(Duration::from_secs(5), "a thread per connection", || {
        proc.status("Threads") >= threads.max(N as u64)
    });
    let vm_mib = proc.status("VmSize") / 1024;
    println!(
        "{N} idle connections: {} threads, VmSize {vm_mib} MiB, RSS {:.0} MiB",
        proc.status("Threads"),
        proc.rss_mib()
    );
    assert!(
        vm_mib < 1024,
        "{N} idle connections reserve {vm_mib} MiB of virtual memory"
    );
    drop(conns);
}

/// `GET / HTTP/2.0`: tiny_http writes its 505 through a writer queued behind the request it
/// has not dropped yet, and waits forever. Each such request holds its connection's thread
/// and two descriptors for good, even after the client goes away.
#[test]
#[ignore = "stock tiny_http 0.12 deadlocks on a request line with HTTP/2.0 or 3.0 (its 505 \
            waits for the writer of the request it still holds) before eventserver sees the \
            request: no answer ever, and the connection is never released. Measured here: 50 \
            such requests, closed by the client, left the server holding 100 more descriptors \
            after the read timeout had passed"]
fn an_http_2_request_line_is_answered_and_its_connection_released() {
    let _turn = crate::support::heavy();
    let (proc, addr, _dir) = start(&[], &["--read-timeout", "1"]);
    answered_within(addr, &healthz(addr), 200, SECOND * 5);
    let fds = proc.fds();
    let conns: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /healthz HTTP/2.0\r\nHost: h2\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    // Each connection waits for its answer at the same time, three read timeouts long.
    let answered = conns
        .iter()
        .map(|c| {
            let mut c = c.try_clone().unwrap();
            thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = [0u8; 12];
                c.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 505")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|ok| *ok)
        .count();
    drop(conns);
    let released = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + SECOND * 3;
    while Instant::now() < deadline && !released.load(Ordering::Relaxed) {
        released.store(proc.fds() <= fds + 4, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{answered} of 50 answered 505; descriptors {} -> {}",
        fds,
        proc.fds()
    );
    assert_eq!(answered, 50, "HTTP/2.0 requests were not answered 505");
    assert!(
        released.load(Ordering::Relaxed),
        "the server still holds {} more descriptors",
        proc.fds() - fds
    );
}
