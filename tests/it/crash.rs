//! Crash durability: the real binary is killed with SIGKILL at random moments
//! while producers append (streams API) and publish (`/publish`), consumers read and
//! acknowledge, and long-poll followers resume; it is restarted on the same database each
//! time. Afterwards, with the server running once more:
//!
//! - every append or publish that got a 200 is present exactly once, in the right stream,
//!   and the acknowledged counters of each producer appear in increasing order;
//! - an append or publish that got no answer is there or not, but never twice and never
//!   half (every stored payload is the whole JSON that was sent);
//! - per-stream sequence numbers are gapless 1..n;
//! - no consumer offset ever moved backwards: no read ever served a consumer an event at or
//!   below one whose ACK had been answered 200, nor below one it had been served first
//!   before (every stream holds only events named `E`, so a read starts right after the
//!   offset);
//! - every event a consumer or a long-poll follower saw while the server was being killed
//!   is still there with the same id, timestamp and content, and each follower, resuming
//!   with `since_time`/`last_id` across restarts, saw a gapless, duplicate-free prefix of the
//!   final log;
//! - the long-poll view of every category (ids, timestamps, data) is the same before and
//!   after the last restart;
//! - after a graceful shutdown the database passes `PRAGMA integrity_check`.
//!
//! Randomness (kill delays, which event a consumer acknowledges) comes from a seed printed
//! at the start. Synchronisation uses deadlines and condition variables; besides the random
//! kill delays, which are the behaviour under test, the only sleeps are short pauses between
//! retries and polls that run under a deadline.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    PASSWORD, Proc, Req, Resp, USER, append_req, publish_req, run, serve, try_send,
};

/// SIGKILLs while the clients run (one more follows, with the clients stopped, to compare
/// the long-poll view before and after a restart).
const KILLS: usize = 25;
/// Random delay between "listening" and SIGKILL, in milliseconds.
const KILL_DELAY_MS: std::ops::Range<u64> = 100..600;
/// Streams `s-0…` written through the streams API, one producer each.
const STREAMS: usize = 3;
/// Categories `pub-0…` written through `/publish`, one publisher each.
const PUBLISHERS: usize = 2;
/// The stream each consumer `c-<i>` reads.
const CONSUMERS: [usize; 4] = [0, 0, 1, 2];
/// Categories followed by long-poll subscribers while the server is being killed.
const FOLLOWED: [&str; 2] = ["pub-0", "s-1"];
/// The only event name producers use.
const NAME: &str = "E";

/// Graceful shutdown must finish within this.
const SHUTDOWN: Duration = Duration::from_secs(20);
/// Connect, write and read timeout of every request; far above any answer's latency.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The checks after the chaos retry a request that got no answer until this has passed.
const ANSWER: Duration = Duration::from_secs(30);
/// After a request failed on a server that is still listed as up, wait at most this long
/// for a new one before retrying the same address.
const RETRY: Duration = Duration::from_millis(200);
/// Examples listed per kind of problem.
const EXAMPLES: usize = 6;

#[test]
fn acknowledged_writes_survive_sigkill() {
    let _turn = crate::support::heavy();
    let started = Instant::now();
    let seed = RandomState::new().hash_one(std::time::SystemTime::now()) | 1;
    eprintln!("crash test seed {seed:#x}");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("events.db");
    add_user(&db);
    let mut log = Vec::new();

    let cluster = Arc::new(Cluster::default());
    let _stop_clients = StopOnDrop(cluster.clone());
    let (mut server, mut addr) = start(&db);
    cluster.up(addr);

    let created: Arc<Vec<AtomicBool>> =
        Arc::new((0..STREAMS).map(|_| AtomicBool::new(false)).collect());
    let producers: Vec<_> = (0..STREAMS)
        .map(|p| {
            let (cluster, created) = (cluster.clone(), created.clone());
            thread::spawn(move || produce(&cluster, p, &created[p]))
        })
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|k| {
            let cluster = cluster.clone();
            thread::spawn(move || publish(&cluster, k))
        })
        .collect();
    let consumers: Vec<_> = CONSUMERS
        .iter()
        .enumerate()
        .map(|(c, &p)| {
            let (cluster, created) = (cluster.clone(), created.clone());
            let rng = Rng(seed.rotate_left(7 * c as u32 + 1) | 1);
            thread::spawn(move || consume(&cluster, c, p, &created[p], rng))
        })
        .collect();
    let followers: Vec<_> = FOLLOWED
        .iter()
        .map(|&category| {
            let cluster = cluster.clone();
            thread::spawn(move || follow(&cluster, category))
        })
        .collect();

    for run in 1..=KILLS {
        let delay = Duration::from_millis(
            KILL_DELAY_MS.start + rng.below(KILL_DELAY_MS.end - KILL_DELAY_MS.start),
        );
        thread::sleep(delay);
        cluster.down();
        addr = restart(&mut server, run, &db, &mut log);
        cluster.up(addr);
    }

    // Let the clients finish their current requests; the server stays up.
    cluster.stop();
    let producers: Vec<WriterLog> = producers.into_iter().map(join).collect();
    let publishers: Vec<WriterLog> = publishers.into_iter().map(join).collect();
    let consumers: Vec<ConsumerLog> = consumers.into_iter().map(join).collect();
    let followers: Vec<Followed> = followers.into_iter().map(join).collect();
    let chaos = started.elapsed();

    // Problems the clients saw while the server was being killed come after those found
    // by the final checks.
    let mut problems = Problems::default();
    let categories: Vec<String> = (0..STREAMS)
        .map(stream_name)
        .chain((0..PUBLISHERS).map(category_name))
        .collect();

    // The long-poll view before and after one more restart, with nothing written between.
    let before = read_categories(addr, &categories);
    addr = restart(&mut server, KILLS + 1, &db, &mut log);
    let after = read_categories(addr, &categories);
    for (category, (b, a)) in categories.iter().zip(before.iter().zip(&after)) {
        if b != a {
            let first = b.iter().zip(a).position(|(x, y)| x != y);
            problems.add("long-poll view changed by a restart", format!(
                "long-poll view of {category} changed across a restart: {} events before, {} after, first difference at index {first:?}",
                b.len(),
                a.len()
            ));
        }
    }

    // Streams: read with a fresh consumer, then check against what the clients saw.
    let mut stats = Stats::default();
    for p in 0..STREAMS {
        let elements = read_stream(addr, &stream_name(p), "verify", &mut problems);
        let observed = consumers
            .iter()
            .filter(|c| c.stream == p)
            .flat_map(|c| c.observed.iter());
        check_stream(
            p,
            &elements,
            &producers[p],
            observed,
            &after[p],
            &mut stats,
            &mut problems,
        );
    }
    for k in 0..PUBLISHERS {
        check_publications(
            k,
            &after[STREAMS + k],
            &publishers[k],
            &mut stats,
            &mut problems,
        );
    }
    for (category, followed) in FOLLOWED.iter().zip(&followers) {
        let index = categories.iter().position(|c| c == category).unwrap();
        let (full, seen) = (&after[index], &followed.seen);
        stats.followed += seen.len();
        if let Some(i) = (0..seen.len()).find(|&i| full.get(i) != Some(&seen[i])) {
            let around = i.saturating_sub(3)..(i + 4);
            let seen_around: Vec<String> = seen
                .get(around.start..around.end.min(seen.len()))
                .unwrap_or_default()
                .iter()
                .zip(&followed.origin[around.start..around.end.min(seen.len())])
                .map(|(e, from)| format!("{} ({from})", describe(e)))
                .collect();
            let full_around: Vec<String> = full
                .get(around.start..around.end.min(full.len()))
                .unwrap_or_default()
                .iter()
                .map(describe)
                .collect();
            problems.add(
                "long-poll follower saw something else",
                format!(
                    "long-poll follower of {category} saw {} events that are not a prefix of the final {}: first difference at index {i}; \
                     from index {} it saw\n      {}\n    and the final log holds\n      {}",
                    seen.len(),
                    full.len(),
                    around.start,
                    seen_around.join("\n      "),
                    full_around.join("\n      ")
                ),
            );
        }
    }
    // Final offsets, through the API: never below the last ACK answered 200.
    for c in &consumers {
        stats.acks_ok += c.acks_ok;
        stats.restart_checks += c.restart_checks;
        let resp = send(
            addr,
            &Req::new(
                addr,
                "GET",
                format!(
                    "/api/v1/streams/{}/events?eventName={NAME}&limit=1",
                    stream_name(c.stream)
                ),
            )
            .auth(USER, PASSWORD)
            .header("X-Consumer-ID", consumer_name(c.index)),
        );
        assert_eq!(
            resp.status,
            200,
            "final read of {}: {}",
            consumer_name(c.index),
            resp.text()
        );
        if let Some(first) = resp
            .json()
            .as_array()
            .and_then(|a| a.first())
            .and_then(|e| e["sequence"].as_u64())
            && (first <= c.last_acked || first < c.last_first)
        {
            problems.add("offset moved backwards", format!(
                "after the last restart {} is served sequence {first}, but its ACK of {} was answered 200 and it was last served from {}",
                consumer_name(c.index),
                c.last_acked,
                c.last_first
            ));
        }
    }

    server.stop_within(SHUTDOWN);
    keep_log(&server, KILLS + 1, &mut log);
    check_database(&db, &mut problems);

    let server_log = log.join("\n");
    eprintln!(
        "crash test: {KILLS} kills while the clients ran ({chaos:?}), 1 more with them stopped ({:?} in total); appends {} acknowledged, {} unanswered ({} of them stored), {} refused; \
         publishes {} acknowledged, {} unanswered ({} stored), {} refused; {} ACKs answered 200, {} offset checks right after a restart, \
         {} events seen by long-poll followers",
        started.elapsed(),
        stats.appends_ok,
        stats.appends_unknown,
        stats.appends_unknown_stored,
        stats.appends_refused,
        stats.publishes_ok,
        stats.publishes_unknown,
        stats.publishes_unknown_stored,
        stats.publishes_refused,
        stats.acks_ok,
        stats.restart_checks,
        stats.followed,
    );
    problems.append(std::mem::take(&mut *lock(&cluster.problems)));
    assert!(
        problems.is_empty(),
        "problems (seed {seed:#x}):\n{problems}\nserver warnings and errors:\n{server_log}"
    );
    assert!(
        stats.appends_ok > 0 && stats.publishes_ok > 0 && stats.acks_ok > 0,
        "the clients got nothing done: {stats:?}"
    );
}

/// Contract violations found, grouped by kind: a count and the first few of each.
#[derive(Default)]
struct Problems {
    kinds: Vec<(&'static str, usize, Vec<String>)>,
}

impl Problems {
    fn add(&mut self, kind: &'static str, message: String) {
        let index = match self.kinds.iter().position(|(k, ..)| *k == kind) {
            Some(i) => i,
            None => {
                self.kinds.push((kind, 0, Vec::new()));
                self.kinds.len() - 1
            }
        };
        let (_, count, examples) = &mut self.kinds[index];
        *count += 1;
        if examples.len() < EXAMPLES {
            examples.push(message);
        }
    }

    fn append(&mut self, other: Problems) {
        for (kind, count, examples) in other.kinds {
            for message in examples {
                self.add(kind, message);
            }
            let index = self.kinds.iter().position(|(k, ..)| *k == kind).unwrap();
            self.kinds[index].1 += count.saturating_sub(EXAMPLES.min(count));
        }
    }

    fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (kind, count, examples) in &self.kinds {
            writeln!(f, "{kind}: {count} time(s), for example")?;
            for example in examples {
                writeln!(f, "    {example}")?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Names and payloads
// ---------------------------------------------------------------------------------------

fn stream_name(p: usize) -> String {
    format!("s-{p}")
}

fn category_name(k: usize) -> String {
    format!("pub-{k}")
}

fn producer_name(p: usize) -> String {
    format!("prod-{p}")
}

fn consumer_name(c: usize) -> String {
    format!("c-{c}")
}

/// Filler that makes a payload long enough to be torn if it were written by halves.
fn pad(who: usize, n: u64) -> String {
    format!("{who}:{n};").repeat(40)
}

// ---------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------

/// Adds the test user with the binary's own `user add` (password on stdin).
fn add_user(db: &Path) {
    let db = db.to_str().expect("a UTF-8 database path");
    run(
        &["user", "add", USER, "--db", db],
        &[],
        Some(&format!("{PASSWORD}\n")),
    )
    .ok();
}

/// `eventserver serve` on the test database, logging at INFO, once it listens.
fn start(db: &Path) -> (Proc, SocketAddr) {
    serve(db, &[], &[("EVENTSERVER_LOG", "info")])
}

/// SIGKILLs `server` (run `run - 1`), files what it logged and starts run `run` on `db`.
fn restart(server: &mut Proc, run: usize, db: &Path, log: &mut Vec<String>) -> SocketAddr {
    server.kill9();
    keep_log(server, run - 1, log);
    let (next, addr) = start(db);
    *server = next;
    addr
}

/// Files the lines `server` (run `run`) logged besides per-request INFO lines.
fn keep_log(server: &Proc, run: usize, log: &mut Vec<String>) {
    let stderr = server.stderr();
    let kept = stderr.lines().filter(|line| !line.starts_with("INFO"));
    log.extend(kept.map(|line| format!("[run {run}] {line}")));
}

// ---------------------------------------------------------------------------------------
// What clients share: where the server is, whether to stop, what went wrong
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Cluster {
    live: Mutex<Live>,
    changed: Condvar,
    stop: AtomicBool,
    problems: Mutex<Problems>,
}

#[derive(Default)]
struct Live {
    addr: Option<SocketAddr>,
    generation: u64,
}

impl Cluster {
    fn up(&self, addr: SocketAddr) {
        let mut live = lock(&self.live);
        live.addr = Some(addr);
        live.generation += 1;
        self.changed.notify_all();
    }

    fn down(&self) {
        lock(&self.live).addr = None;
        self.changed.notify_all();
    }

    fn stop(&self) {
        let _live = lock(&self.live);
        self.stop.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    fn problem(&self, kind: &'static str, message: String) {
        lock(&self.problems).add(kind, message);
    }

    /// The server to talk to and its generation, waiting while it is down; `None` once the
    /// clients are to stop. After a request on generation `failed` got no usable answer,
    /// waits for a newer server, or [`RETRY`] if the old one is still listed as up.
    fn target(&self, failed: Option<u64>) -> Option<(SocketAddr, u64)> {
        let retry_at = Instant::now() + RETRY;
        let mut live = lock(&self.live);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let now = Instant::now();
            if let Some(addr) = live.addr
                && (failed != Some(live.generation) || now >= retry_at)
            {
                return Some((addr, live.generation));
            }
            let wait = if live.addr.is_some() {
                retry_at - now
            } else {
                Duration::from_secs(1)
            };
            live = self
                .changed
                .wait_timeout(live, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Stops the clients when the test ends, passing or not.
struct StopOnDrop(Arc<Cluster>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn join<T>(handle: thread::JoinHandle<T>) -> T {
    handle.join().expect("client thread panicked")
}

/// xorshift64*: enough for kill delays and choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---------------------------------------------------------------------------------------
// HTTP: one request per connection; anything short of a whole response is "no answer"
// ---------------------------------------------------------------------------------------

/// Sends `req` and reads the whole response, or `None` if there was none (refused, reset,
/// cut short: the server died).
fn exchange(addr: SocketAddr, req: &Req) -> Option<Resp> {
    try_send(addr, req, IO_TIMEOUT).ok()
}

/// For the checks after the chaos: the server is up, so an answer is required. Every
/// request sent this way is idempotent (reads, ACKs), so a lost connection (a loaded
/// machine, descriptors used up by tests running alongside) is retried until [`ANSWER`].
#[track_caller]
fn send(addr: SocketAddr, req: &Req) -> Resp {
    let deadline = Instant::now() + ANSWER;
    loop {
        if let Some(resp) = exchange(addr, req) {
            return resp;
        }
        if Instant::now() >= deadline {
            let bytes = req.bytes();
            let head = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
            panic!("no answer within {ANSWER:?} to {head:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// What one producer or publisher did: counters `n` (1, 2, … one per attempt) by outcome.
#[derive(Default, Debug)]
struct WriterLog {
    /// Answered 200, with the event id for appends.
    acked: Vec<(u64, Option<String>)>,
    /// No answer: may or may not be stored.
    unknown: HashSet<u64>,
    /// Answered with an error status that stores nothing.
    refused: Vec<(u64, u16, String)>,
}

impl WriterLog {
    /// Files a non-200 answer; only 503 ("retry later") and 500 are expected around crashes.
    fn refuse(&mut self, cluster: &Cluster, who: &str, n: u64, resp: &Resp) {
        if resp.status == 500 {
            // "Anything else": the outcome is not specified, so treat it as unknown.
            self.unknown.insert(n);
        } else {
            self.refused.push((n, resp.status, resp.text()));
        }
        if !matches!(resp.status, 500 | 503) {
            cluster.problem(
                "unexpected answer",
                format!("{who}: write {n} answered {}: {}", resp.status, resp.text()),
            );
        }
    }
}

/// Sends `request(addr, n)` for n = 1, 2, … one at a time to whichever server is up, until
/// the clients stop; `answered` files each 200.
fn write(
    cluster: &Cluster,
    who: &str,
    request: impl Fn(SocketAddr, u64) -> Req,
    mut answered: impl FnMut(u64, &Resp, &mut WriterLog),
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut n = 0;
    let mut failed = None;
    while let Some((addr, generation)) = cluster.target(failed.take()) {
        n += 1;
        match exchange(addr, &request(addr, n)) {
            None => {
                log.unknown.insert(n);
                failed = Some(generation);
            }
            Some(resp) if resp.status == 200 => answered(n, &resp, &mut log),
            Some(resp) => {
                log.refuse(cluster, who, n, &resp);
                failed = Some(generation);
            }
        }
    }
    log
}

/// Appends `{"p":p,"n":n,"pad":…}` events named `E` to `s-<p>`, one at a time.
fn produce(cluster: &Cluster, p: usize, created: &AtomicBool) -> WriterLog {
    let (stream, producer) = (stream_name(p), producer_name(p));
    let request = |addr, n| {
        let body = json!({"event": {"name": NAME}, "payload": {"p": p, "n": n, "pad": pad(p, n)}});
        append_req(addr, &stream, &producer, &body)
    };
    write(
        cluster,
        &producer,
        request,
        |n, resp, log| match serde_json::from_slice::<String>(&resp.body) {
            Ok(id) => {
                log.acked.push((n, Some(id)));
                created.store(true, Ordering::SeqCst);
            }
            Err(_) => {
                cluster.problem(
                    "unexpected answer",
                    format!("{producer}: append {n} answered 200 {:?}", resp.text()),
                );
                log.unknown.insert(n);
            }
        },
    )
}

/// Publishes `{"k":k,"n":n,"pad":…}` to `pub-<k>`, one at a time.
fn publish(cluster: &Cluster, k: usize) -> WriterLog {
    let category = category_name(k);
    let who = format!("publisher {k}");
    let request =
        |addr, n| publish_req(addr, &category, &json!({"k": k, "n": n, "pad": pad(k, n)}));
    write(cluster, &who, request, |n, resp, log| {
        if serde_json::from_slice::<Value>(&resp.body).ok() != Some(json!({"success": true})) {
            cluster.problem(
                "unexpected answer",
                format!("{who}: publish {n} answered 200 {:?}", resp.text()),
            );
        }
        log.acked.push((n, None));
    })
}

/// What one consumer saw.
#[derive(Debug)]
struct ConsumerLog {
    index: usize,
    stream: usize,
    /// Every element served to it, by sequence number.
    observed: BTreeMap<u64, Value>,
    /// The highest sequence whose ACK was answered 200.
    last_acked: u64,
    /// The first sequence of its latest non-empty read.
    last_first: u64,
    acks_ok: usize,
    /// Non-empty first reads after a restart (each checked against `last_acked`).
    restart_checks: usize,
}

/// Reads up to 50 events of `s-<p>` as consumer `c-<c>` (waiting up to 1 s for some) and
/// acknowledges one of them, chosen at random (ACKs are cumulative).
fn consume(
    cluster: &Cluster,
    c: usize,
    p: usize,
    created: &AtomicBool,
    mut rng: Rng,
) -> ConsumerLog {
    let (consumer, stream) = (consumer_name(c), stream_name(p));
    let mut log = ConsumerLog {
        index: c,
        stream: p,
        observed: BTreeMap::new(),
        last_acked: 0,
        last_first: 0,
        acks_ok: 0,
        restart_checks: 0,
    };
    let mut checked_generation = 0;
    let mut failed = None;
    while let Some((addr, generation)) = cluster.target(failed.take()) {
        let exists = created.load(Ordering::SeqCst);
        let req = Req::new(
            addr,
            "GET",
            format!("/api/v1/streams/{stream}/events?eventName={NAME}&limit=50&timeout=1"),
        )
        .auth(USER, PASSWORD)
        .header("X-Consumer-ID", &consumer);
        let Some(resp) = exchange(addr, &req) else {
            failed = Some(generation);
            continue;
        };
        if resp.status != 200 {
            if !(resp.status == 503 || resp.status == 404 && !exists) {
                cluster.problem(
                    "unexpected answer",
                    format!("{consumer}: read answered {}: {}", resp.status, resp.text()),
                );
            }
            failed = Some(generation);
            continue;
        }
        let Some(elements) = serde_json::from_slice::<Value>(&resp.body)
            .ok()
            .and_then(|v| v.as_array().cloned())
        else {
            cluster.problem(
                "unexpected answer",
                format!("{consumer}: read answered 200 {:?}", resp.text()),
            );
            continue;
        };
        let Some(first) = elements.first().and_then(|e| e["sequence"].as_u64()) else {
            if !elements.is_empty() {
                cluster.problem(
                    "unexpected answer",
                    format!("{consumer}: element without a sequence: {}", elements[0]),
                );
            }
            continue;
        };
        if checked_generation != generation {
            checked_generation = generation;
            log.restart_checks += 1;
        }
        if first <= log.last_acked || first < log.last_first {
            cluster.problem("offset moved backwards", format!(
                "{consumer}: offset moved backwards: served sequence {first} on server run {generation}, \
                 after its ACK of sequence {} was answered 200 and it had been served from {}",
                log.last_acked, log.last_first
            ));
        }
        log.last_first = first;
        for (i, element) in elements.iter().enumerate() {
            let seq = element["sequence"].as_u64().unwrap_or(0);
            if seq != first + i as u64 {
                cluster.problem(
                    "sequence gap",
                    format!(
                        "{consumer}: read of {stream} skipped from {first} to {seq} at index {i}"
                    ),
                );
            }
            if let Some(old) = log.observed.insert(seq, element.clone())
                && old != *element
            {
                cluster.problem(
                    "stored event changed",
                    format!(
                        "{consumer}: sequence {seq} of {stream} changed from {old} to {element}"
                    ),
                );
            }
        }
        let chosen = if rng.below(2) == 0 {
            elements.len() - 1
        } else {
            rng.below(elements.len() as u64) as usize
        };
        let (Some(id), Some(seq)) = (
            elements[chosen]["eventId"].as_str(),
            elements[chosen]["sequence"].as_u64(),
        ) else {
            cluster.problem(
                "unexpected answer",
                format!("{consumer}: element without an id: {}", elements[chosen]),
            );
            continue;
        };
        let req = Req::new(
            addr,
            "POST",
            format!("/api/v1/streams/{stream}/events/{id}"),
        )
        .auth(USER, PASSWORD)
        .header("X-Consumer-ID", &consumer)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("action=ACK");
        match exchange(addr, &req) {
            None => failed = Some(generation),
            Some(resp) if resp.status == 200 => {
                log.acks_ok += 1;
                log.last_acked = log.last_acked.max(seq);
            }
            Some(resp) => {
                if resp.status != 503 {
                    cluster.problem(
                        "unexpected answer",
                        format!(
                            "{consumer}: ACK of {seq} ({id}) answered {}: {}",
                            resp.status,
                            resp.text()
                        ),
                    );
                }
                failed = Some(generation);
            }
        }
    }
    log
}

/// One long-poll event as delivered.
#[derive(Debug, Clone, PartialEq)]
struct Polled {
    id: String,
    timestamp: u64,
    data: Value,
}

/// What a long-poll follower saw: every event in order, and where each came from.
struct Followed {
    seen: Vec<Polled>,
    /// Per event: the server run and the request that delivered it.
    origin: Vec<String>,
}

/// Follows `category` by long-poll from the beginning, resuming after the last event seen
/// (`since_time` + `last_id`) across restarts.
fn follow(cluster: &Cluster, category: &str) -> Followed {
    let mut seen: Vec<Polled> = Vec::new();
    let mut origin = Vec::new();
    let mut ids = HashMap::new();
    let mut failed = None;
    while let Some((addr, generation)) = cluster.target(failed.take()) {
        let path = poll_path(category, seen.last());
        let req = Req::new(addr, "GET", &path).auth(USER, PASSWORD);
        let Some(resp) = exchange(addr, &req) else {
            failed = Some(generation);
            continue;
        };
        match parse_poll(category, &resp) {
            Ok(events) => {
                let from = format!("run {generation}, answer of {} to {path}", events.len());
                for event in events {
                    if let Some(earlier) = ids.insert(event.id.clone(), seen.len()) {
                        cluster.problem(
                            "long-poll duplicate",
                            format!(
                                "long-poll of {category} delivered {} at index {} ({from}) and before at index {earlier} ({})",
                                event.id,
                                seen.len(),
                                origin[earlier]
                            ),
                        );
                    }
                    seen.push(event);
                    origin.push(from.clone());
                }
            }
            Err(e) => {
                if resp.status != 503 {
                    cluster.problem("unexpected answer", format!("long-poll of {category}: {e}"));
                }
                failed = Some(generation);
            }
        }
    }
    Followed { seen, origin }
}

/// One line describing a long-poll event (with its sequence number, for stream elements).
fn describe(e: &Polled) -> String {
    format!(
        "id {} ts {} seq {} n {}",
        e.id,
        e.timestamp,
        e.data["sequence"],
        e.data["n"]
            .as_u64()
            .or(e.data["payload"]["n"].as_u64())
            .unwrap_or(0)
    )
}

fn poll_path(category: &str, after: Option<&Polled>) -> String {
    match after {
        None => format!("/events?category={category}&timeout=1&since_time=0"),
        Some(e) => format!(
            "/events?category={category}&timeout=1&since_time={}&last_id={}",
            e.timestamp, e.id
        ),
    }
}

/// The events of a long-poll answer (none for a timeout), or what is wrong with it.
fn parse_poll(category: &str, resp: &Resp) -> Result<Vec<Polled>, String> {
    if resp.status != 200 {
        return Err(format!("answered {}: {}", resp.status, resp.text()));
    }
    let body: Value =
        serde_json::from_slice(&resp.body).map_err(|e| format!("{e}: {}", resp.text()))?;
    if body.get("timeout").is_some() {
        return Ok(Vec::new());
    }
    let events = body["events"]
        .as_array()
        .ok_or_else(|| format!("unexpected answer {body}"))?;
    events
        .iter()
        .map(|e| {
            match (
                e["id"].as_str(),
                e["timestamp"].as_u64(),
                e["category"].as_str(),
            ) {
                (Some(id), Some(timestamp), Some(c))
                    if c == category && e.get("data").is_some() =>
                {
                    Ok(Polled {
                        id: id.to_owned(),
                        timestamp,
                        data: e["data"].clone(),
                    })
                }
                _ => Err(format!("malformed event {e}")),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reading everything back
// ---------------------------------------------------------------------------------------

/// Every event of each category, by long-poll from the beginning (in parallel: each ends
/// with a one-second timeout answer).
fn read_categories(addr: SocketAddr, categories: &[String]) -> Vec<Vec<Polled>> {
    thread::scope(|s| {
        let readers: Vec<_> = categories
            .iter()
            .map(|category| {
                s.spawn(move || {
                    let mut all: Vec<Polled> = Vec::new();
                    loop {
                        let req = Req::new(addr, "GET", poll_path(category, all.last()))
                            .auth(USER, PASSWORD);
                        let events = parse_poll(category, &send(addr, &req))
                            .unwrap_or_else(|e| panic!("reading {category} by long-poll: {e}"));
                        if events.is_empty() {
                            return all;
                        }
                        all.extend(events);
                    }
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().expect("reader thread panicked"))
            .collect()
    })
}

/// Every `E` event of `stream` through the streams API, as a fresh consumer: reads 1000 at
/// a time and acknowledges the last to move on. Stops (with a problem) if a page does not
/// start after the previous one: the ACK did not move the offset.
fn read_stream(
    addr: SocketAddr,
    stream: &str,
    consumer: &str,
    problems: &mut Problems,
) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let resp = send(
            addr,
            &Req::new(
                addr,
                "GET",
                format!("/api/v1/streams/{stream}/events?eventName={NAME}&limit=1000"),
            )
            .auth(USER, PASSWORD)
            .header("X-Consumer-ID", consumer),
        );
        assert_eq!(resp.status, 200, "reading {stream}: {}", resp.text());
        let page = resp.json().as_array().cloned().expect("an array");
        let Some(last) = page.last() else {
            return all;
        };
        let previous = all.last().map(|e| &e["sequence"]);
        if let Some(previous) = previous
            && page[0]["sequence"].as_u64() <= previous.as_u64()
        {
            problems.add(
                "offset moved backwards",
                format!(
                    "{stream}: after acknowledging sequence {previous}, consumer {consumer} is served {} again",
                    page[0]["sequence"]
                ),
            );
            return all;
        }
        let id = last["eventId"].as_str().expect("an eventId").to_owned();
        let ack = send(
            addr,
            &Req::new(
                addr,
                "POST",
                format!("/api/v1/streams/{stream}/events/{id}"),
            )
            .auth(USER, PASSWORD)
            .header("X-Consumer-ID", consumer)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("action=ACK"),
        );
        assert_eq!(
            ack.status,
            200,
            "ACK while reading {stream}: {}",
            ack.text()
        );
        all.extend(page);
    }
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Stats {
    appends_ok: usize,
    appends_unknown: usize,
    appends_unknown_stored: usize,
    appends_refused: usize,
    publishes_ok: usize,
    publishes_unknown: usize,
    publishes_unknown_stored: usize,
    publishes_refused: usize,
    acks_ok: usize,
    restart_checks: usize,
    followed: usize,
}

fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    keys
}

/// Stored counters against the writer's log: every acknowledged one exactly once with
/// increasing positions, nothing twice, nothing that was refused or never sent.
/// `stored` maps each counter to its position (and event id, for appends) in the order read.
fn check_writer(
    who: &str,
    stored: &[(u64, Option<String>)],
    log: &WriterLog,
    problems: &mut Problems,
) -> usize {
    let mut position: HashMap<u64, (usize, Option<&str>)> = HashMap::new();
    for (i, (n, id)) in stored.iter().enumerate() {
        if position.insert(*n, (i, id.as_deref())).is_some() {
            problems.add(
                "stored twice",
                format!("{who}: counter {n} is stored twice"),
            );
        }
        if !log.unknown.contains(n) && !log.acked.iter().any(|(a, _)| a == n) {
            let refused = log.refused.iter().find(|(r, ..)| r == n);
            problems.add("stored but refused or never sent", format!(
                "{who}: counter {n} is stored, but its request was answered {refused:?} (or never sent)"
            ));
        }
    }
    let mut last: Option<(u64, usize)> = None;
    for (n, id) in &log.acked {
        match position.get(n) {
            None => problems.add(
                "acknowledged write lost",
                format!("{who}: counter {n} was acknowledged with a 200 but is not stored"),
            ),
            Some((i, stored_id)) => {
                if id.is_some() && id.as_deref() != *stored_id {
                    problems.add("acknowledged id changed", format!("{who}: counter {n} was acknowledged as {id:?} but is stored as {stored_id:?}"));
                }
                if let Some((m, j)) = last
                    && j >= *i
                {
                    problems.add("acknowledged writes out of order", format!("{who}: acknowledged counter {n} is stored at {i}, before acknowledged counter {m} at {j}"));
                }
                last = Some((*n, *i));
            }
        }
    }
    log.unknown
        .iter()
        .filter(|n| position.contains_key(n))
        .count()
}

/// A streams-API stream: whole elements, gapless sequences, the producer's log, what the
/// consumers and the long-poll view saw.
fn check_stream<'a>(
    p: usize,
    elements: &[Value],
    log: &WriterLog,
    observed: impl Iterator<Item = (&'a u64, &'a Value)>,
    polled: &[Polled],
    stats: &mut Stats,
    problems: &mut Problems,
) {
    let stream = stream_name(p);
    let mut stored = Vec::new();
    for (i, e) in elements.iter().enumerate() {
        let seq = e["sequence"].as_u64();
        if seq != Some(i as u64 + 1) {
            problems.add(
                "sequence gap",
                format!(
                    "{stream}: element {i} has sequence {seq:?}, expected {} (gapless 1..n)",
                    i + 1
                ),
            );
        }
        let payload = &e["payload"];
        let n = payload["n"].as_u64();
        let whole = keys(e) == ["event", "eventId", "payload", "sequence", "timestamp"]
            && e["event"] == json!({"name": NAME})
            && e["eventId"]
                .as_str()
                .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok())
            && e["timestamp"].as_u64().is_some()
            && keys(payload) == ["n", "p", "pad"]
            && payload["p"] == json!(p)
            && n.is_some_and(|n| payload["pad"] == json!(pad(p, n)));
        if !whole {
            problems.add(
                "half or foreign event",
                format!("{stream}: element {i} is not a whole event of producer {p}: {e}"),
            );
            continue;
        }
        stored.push((n.unwrap(), e["eventId"].as_str().map(str::to_owned)));
    }
    let stored_unknown = check_writer(&producer_name(p), &stored, log, problems);
    stats.appends_ok += log.acked.len();
    stats.appends_unknown += log.unknown.len();
    stats.appends_unknown_stored += stored_unknown;
    stats.appends_refused += log.refused.len();

    for (seq, seen) in observed {
        let now = usize::try_from(*seq)
            .ok()
            .and_then(|s| elements.get(s.wrapping_sub(1)));
        if now != Some(seen) {
            problems.add(
                "stored event changed",
                format!(
                    "{stream}: a consumer was served {seen} at sequence {seq}; now it is {now:?}"
                ),
            );
        }
    }
    // The long-poll view of the stream is the same log: same ids, timestamps, elements.
    let same = polled.len() == elements.len()
        && polled.iter().zip(elements).all(|(polled, e)| {
            e["eventId"] == json!(polled.id)
                && e["timestamp"] == json!(polled.timestamp)
                && polled.data == *e
        });
    if !same {
        problems.add("long-poll view differs from streams view", format!(
            "{stream}: the long-poll view ({} events) differs from the streams-API view ({} elements)",
            polled.len(),
            elements.len()
        ));
    }
}

/// A `/publish` category: whole data, unique ids, ordered timestamps, the publisher's log.
fn check_publications(
    k: usize,
    polled: &[Polled],
    log: &WriterLog,
    stats: &mut Stats,
    problems: &mut Problems,
) {
    let category = category_name(k);
    let mut stored = Vec::new();
    let mut ids = HashSet::new();
    let mut last_ts = 0;
    for (i, e) in polled.iter().enumerate() {
        if !ids.insert(&e.id) || uuid::Uuid::parse_str(&e.id).is_err() {
            problems.add(
                "long-poll duplicate",
                format!(
                    "{category}: event {i} has a repeated or invalid id {}",
                    e.id
                ),
            );
        }
        if e.timestamp < last_ts {
            problems.add(
                "timestamps out of order",
                format!(
                    "{category}: event {i} has timestamp {} below its predecessor's {last_ts}",
                    e.timestamp
                ),
            );
        }
        last_ts = e.timestamp;
        let n = e.data["n"].as_u64();
        let whole = keys(&e.data) == ["k", "n", "pad"]
            && e.data["k"] == json!(k)
            && n.is_some_and(|n| e.data["pad"] == json!(pad(k, n)));
        if !whole {
            problems.add(
                "half or foreign event",
                format!(
                    "{category}: event {i} is not a whole publication of publisher {k}: {:?}",
                    e.data
                ),
            );
            continue;
        }
        stored.push((n.unwrap(), None));
    }
    let stored_unknown = check_writer(&format!("publisher {k}"), &stored, log, problems);
    stats.publishes_ok += log.acked.len();
    stats.publishes_unknown += log.unknown.len();
    stats.publishes_unknown_stored += stored_unknown;
    stats.publishes_refused += log.refused.len();
}

/// After the final, graceful shutdown: SQLite's own integrity check, and per stream (the
/// `/publish` ones included) gapless sequence numbers 1..last_seq on disk.
fn check_database(db: &Path, problems: &mut Problems) {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the database read-only");
    let verdict: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    if verdict != ["ok"] {
        problems.add(
            "database corrupt",
            format!("PRAGMA integrity_check: {verdict:?}"),
        );
    }
    let rows: Vec<(String, i64, i64, i64, i64)> = conn
        .prepare(
            "SELECT s.name, s.last_seq, count(e.seq), coalesce(min(e.seq), 0), coalesce(max(e.seq), 0) \
             FROM stream_heads s LEFT JOIN events e ON e.stream_id = s.id GROUP BY s.id ORDER BY s.name",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (name, last_seq, count, min, max) in &rows {
        if *count != *last_seq || *max != *last_seq || (*count > 0 && *min != 1) {
            problems.add("sequence gap", format!(
                "on disk, stream {name} has last_seq {last_seq} but {count} events numbered {min}..={max}"
            ));
        }
    }
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for want in (0..STREAMS)
        .map(stream_name)
        .chain((0..PUBLISHERS).map(category_name))
    {
        if !names.contains(&want.as_str()) {
            problems.add(
                "stream missing",
                format!("on disk, stream {want} is missing (streams: {names:?})"),
            );
        }
    }
}
