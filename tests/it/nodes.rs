//! Several nodes on one PostgreSQL database: a poll parked on one node is answered by an
//! append through the other, a long-poll client alternating nodes gets every event once and
//! in order while both publish, a race for new streams through both nodes has one winner
//! each, `kill -9` of a node under load loses no acknowledged event while the other keeps
//! serving, and a PostgreSQL restart under load is answered with prompt 503s and recovered
//! from without losing anything, polls parked through it keeping their place.
//!
//! The nodes run in process ([`TestServer::two_nodes_or_skip`]) except where one is killed:
//! there they are the real binary, two child processes.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    Database, PASSWORD, Postgres, Req, Resp, TestServer, USER, append_ok, append_req, consume_req,
    event, heavy, publish_ok, publish_req, read_response, serve, subscribe_req, try_send,
    wait_until,
};

/// How soon a poll parked on one node must be answered after an append through another.
const WAKE_UP: Duration = Duration::from_secs(2);
/// How long any write may take while PostgreSQL is away: an answer (503), never a hang.
const NO_HANG: Duration = Duration::from_secs(3);

/// A long-poll event as these tests read it.
#[derive(Debug, Clone)]
struct Ev {
    ts: u64,
    id: String,
    data: Value,
}

impl Ev {
    /// The producer and number of a `{"t": producer, "n": number}` datum.
    fn origin(&self) -> (u64, u64) {
        let field = |name: &str| {
            self.data[name]
                .as_u64()
                .unwrap_or_else(|| panic!("data {}", self.data))
        };
        (field("t"), field("n"))
    }
}

/// The events of a subscribe answer; none for a timeout answer.
#[track_caller]
fn events(resp: &Resp) -> Vec<Ev> {
    assert_eq!(resp.status, 200, "subscribe: {}", resp.text());
    let body = resp.json();
    if body.get("timeout").is_some() {
        return Vec::new();
    }
    let events = body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("neither events nor a timeout: {body}"));
    events
        .iter()
        .map(|e| Ev {
            ts: e["timestamp"].as_u64().expect("timestamp"),
            id: e["id"].as_str().expect("id").to_owned(),
            data: e["data"].clone(),
        })
        .collect()
}

/// The subscribe query resuming after `last`, or from the start of time.
fn resume(category: &str, timeout: u64, last: Option<&Ev>) -> String {
    match last {
        Some(e) => format!(
            "timeout={timeout}&category={category}&since_time={}&last_id={}",
            e.ts, e.id
        ),
        None => format!("timeout={timeout}&category={category}&since_time=0"),
    }
}

/// Every event of `category`, read through the node at `addr` as a client pages.
fn read_all(addr: SocketAddr, category: &str) -> Vec<Ev> {
    read_all_with(category, |query| subscribe_req(addr, query).send())
}

/// Every event of `category`, each page asked for with `ask(query)`.
fn read_all_with(category: &str, ask: impl Fn(&str) -> Resp) -> Vec<Ev> {
    let mut all: Vec<Ev> = Vec::new();
    loop {
        let page = events(&ask(&resume(category, 1, all.last())));
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Asserts that every acknowledged `(producer, n)` is in `stream` exactly once, that no
/// event is there twice (one whose answer was lost with its node may be there once), that
/// each producer's events are in the order it published them, and that timestamps never
/// decrease along the stream.
#[track_caller]
fn assert_acknowledged_once_in_order(stream: &[Ev], acknowledged: &[(u64, u64)]) {
    let origins: Vec<(u64, u64)> = stream.iter().map(Ev::origin).collect();
    let mut seen = HashSet::new();
    for origin in &origins {
        assert!(seen.insert(*origin), "{origin:?} is in the stream twice");
    }
    for origin in acknowledged {
        assert!(seen.contains(origin), "acknowledged {origin:?} is lost");
    }
    let mut last: HashMap<u64, u64> = HashMap::new();
    for (producer, n) in &origins {
        if let Some(before) = last.insert(*producer, *n) {
            assert!(before < *n, "producer {producer}: {n} after {before}");
        }
    }
    assert!(
        stream.windows(2).all(|w| w[0].ts <= w[1].ts),
        "timestamps decrease along the stream"
    );
}

/// Sends `req` on its own thread; its answer arrives on the receiver.
fn answer_later(req: Req) -> Receiver<Resp> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(req.send());
    });
    rx
}

/// The answer on `rx`, which must come within [`WAKE_UP`] of `since`.
#[track_caller]
fn woken(rx: &Receiver<Resp>, since: Instant, what: &str) -> Resp {
    let resp = rx
        .recv_timeout(WAKE_UP.saturating_sub(since.elapsed()))
        .unwrap_or_else(|_| panic!("{what}: not answered within {WAKE_UP:?} of the append"));
    assert_eq!(resp.status, 200, "{what}: {}", resp.text());
    resp
}

#[test]
fn a_poll_parked_on_one_node_is_answered_by_an_append_through_the_other() {
    let test = "a_poll_parked_on_one_node_is_answered_by_an_append_through_the_other";
    let Some(server) = TestServer::two_nodes_or_skip(test) else {
        return;
    };
    let [a, b] = server.addrs()[..] else {
        panic!("two nodes");
    };
    // The long-poll API: a subscriber waiting on B, a publish through A.
    let poll = answer_later(subscribe_req(b, "timeout=30&category=wake"));
    wait_until(Duration::from_secs(10), "the poll parked on B", || {
        server.parked() == 1
    });
    publish_ok(a, "wake", &json!({"t": 0, "n": 1}));
    let published = Instant::now();
    let got = events(&woken(&poll, published, "long-poll on B"));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].data, json!({"t": 0, "n": 1}));
    // The streams API: a consumer waiting on B for an event name, an append through A.
    append_ok(a, "wake-s", "p", &event("Other"));
    let read = consume_req(b, "wake-s", "c", "eventName=Wanted&limit=5&timeout=30");
    let read = answer_later(read);
    wait_until(Duration::from_secs(10), "the read parked on B", || {
        server.parked() == 1
    });
    let id = append_ok(a, "wake-s", "p", &event("Wanted"));
    let appended = Instant::now();
    let elements = woken(&read, appended, "consumer read on B").json();
    assert_eq!(elements.as_array().map(Vec::len), Some(1), "{elements}");
    assert_eq!(elements[0]["eventId"], json!(id));
}

/// A poll sent after a 200 from one node sees that event on the other, in its first answer,
/// though the other node's memory has not heard of it yet: as on one node.
#[test]
fn a_poll_on_one_node_after_a_200_from_the_other_sees_the_event_at_once() {
    let test = "a_poll_on_one_node_after_a_200_from_the_other_sees_the_event_at_once";
    let Some(server) = TestServer::two_nodes_or_skip(test) else {
        return;
    };
    let [a, b] = server.addrs()[..] else {
        panic!("two nodes");
    };
    let (mut first, mut latest): (Option<Ev>, Option<Ev>) = (None, None);
    for n in 0..40 {
        // Both nodes' memories hold the category: each answers from its tail if it can,
        // resuming from the first event (several to answer with) or the latest.
        let (from, to) = if n % 2 == 0 { (a, b) } else { (b, a) };
        publish_ok(from, "yours", &json!({"t": 0, "n": n}));
        let after = if n % 3 == 0 { &first } else { &latest };
        let got = events(&subscribe_req(to, &resume("yours", 5, after.as_ref())).send());
        let last = got.last().map(Ev::origin);
        assert_eq!(
            last,
            Some((0, n)),
            "poll {n} through the other node: {got:?}"
        );
        first = first.or_else(|| got.first().cloned());
        latest = got.last().cloned();
    }
}

#[test]
fn long_polls_alternating_nodes_get_every_event_once_in_order_while_both_publish() {
    const PER_PRODUCER: u64 = 150;
    let test = "long_polls_alternating_nodes_get_every_event_once_in_order_while_both_publish";
    let Some(server) = TestServer::two_nodes_or_skip(test) else {
        return;
    };
    let addrs = server.addrs();
    let producers: Vec<JoinHandle<()>> = (0..2)
        .map(|t| {
            let addr = addrs[t];
            thread::spawn(move || {
                for n in 0..PER_PRODUCER {
                    publish_ok(addr, "mixed", &json!({"t": t, "n": n}));
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: Vec<Ev> = Vec::new();
    for turn in 0.. {
        if seen.len() as u64 >= 2 * PER_PRODUCER {
            break;
        }
        assert!(Instant::now() < deadline, "only {} events", seen.len());
        let query = resume("mixed", 5, seen.last());
        seen.extend(events(&subscribe_req(addrs[turn % 2], &query).send()));
    }
    for producer in producers {
        producer.join().expect("producer");
    }
    let everything: Vec<(u64, u64)> = (0..2)
        .flat_map(|t| (0..PER_PRODUCER).map(move |n| (t, n)))
        .collect();
    assert_acknowledged_once_in_order(&seen, &everything);
    assert_eq!(seen.len(), everything.len(), "nothing besides");
    // In the stream's own order, whichever node is asked.
    for addr in addrs {
        let stored: Vec<String> = read_all(addr, "mixed").into_iter().map(|e| e.id).collect();
        let polled: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(stored, polled, "the order the polls saw is the stream's");
    }
}

#[test]
fn a_race_for_new_streams_through_two_nodes_has_exactly_one_winner_each() {
    const STREAMS: usize = 16;
    const PRODUCERS: usize = 6;
    let test = "a_race_for_new_streams_through_two_nodes_has_exactly_one_winner_each";
    let Some(server) = TestServer::two_nodes_or_skip(test) else {
        return;
    };
    let addrs = server.addrs();
    let barrier = Arc::new(Barrier::new(STREAMS * PRODUCERS));
    let racers: Vec<_> = (0..STREAMS * PRODUCERS)
        .map(|i| {
            let (stream, producer) = (i / PRODUCERS, i % PRODUCERS);
            let addr = addrs[producer % 2];
            let body = json!({"event": {"name": "Claim"}, "payload": {"producer": producer}});
            let req = append_req(
                addr,
                &format!("race-{stream}"),
                &format!("p{producer}"),
                &body,
            );
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut conn = TcpStream::connect(addr).expect("connect");
                conn.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                barrier.wait();
                conn.write_all(&req.bytes()).expect("write");
                let resp = read_response(&mut BufReader::new(conn)).expect("answer");
                (stream, producer, resp)
            })
        })
        .collect();
    let mut winners: HashMap<usize, Vec<usize>> = HashMap::new();
    for racer in racers {
        let (stream, producer, resp) = racer.join().expect("racer");
        match resp.status {
            200 => winners.entry(stream).or_default().push(producer),
            423 => {}
            other => panic!("race-{stream} p{producer}: {other} {}", resp.text()),
        }
    }
    for stream in 0..STREAMS {
        let won = winners.get(&stream).cloned().unwrap_or_default();
        assert_eq!(won.len(), 1, "race-{stream}: winners {won:?}");
        // Only the winner's event is stored, whichever node reads it.
        for addr in &addrs {
            let read = consume_req(
                *addr,
                &format!("race-{stream}"),
                "c",
                "eventName=Claim&limit=10",
            );
            let elements = read.send().json();
            assert_eq!(elements.as_array().map(Vec::len), Some(1), "{elements}");
            assert_eq!(elements[0]["payload"]["producer"], json!(won[0]));
        }
    }
}

/// What one publishing thread got: the `n`s answered 200, and every other outcome.
struct Published {
    acknowledged: Vec<u64>,
    refused: Vec<(u64, String)>,
}

/// How a publishing thread is doing, read while it runs.
#[derive(Default)]
struct Tally {
    acknowledged: AtomicU64,
    refused: AtomicU64,
}

impl Tally {
    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::SeqCst)
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

/// Publishes `{"t": t, "n": 0, 1, …}` to `category` through `addr`, one connection per
/// request, until `stop` is set or, with `until_unreachable`, until the node stops
/// answering. Every request must be answered within `within`, or it is refused with the
/// error.
fn publisher(
    addr: SocketAddr,
    t: u64,
    category: &'static str,
    within: Duration,
    until_unreachable: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> JoinHandle<Published> {
    thread::spawn(move || {
        let mut out = Published {
            acknowledged: Vec::new(),
            refused: Vec::new(),
        };
        for n in 0.. {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let req = publish_req(addr, category, &json!({"t": t, "n": n}));
            let sent = Instant::now();
            let refusal = match try_send(addr, &req, within) {
                Ok(resp) if resp.status == 200 => {
                    out.acknowledged.push(n);
                    tally.acknowledged.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                Ok(resp) => format!("{} {}", resp.status, resp.text()),
                Err(_) if until_unreachable => break,
                Err(e) => format!("{e} after {:?}", sent.elapsed()),
            };
            out.refused.push((n, refusal));
            tally.refused.fetch_add(1, Ordering::SeqCst);
        }
        out
    })
}

#[test]
fn killing_one_node_under_load_loses_no_acknowledged_event_and_the_other_keeps_serving() {
    let test =
        "killing_one_node_under_load_loses_no_acknowledged_event_and_the_other_keeps_serving";
    let Some(database) = Database::fresh_or_skip(test) else {
        return;
    };
    let _heavy = heavy();
    let url = database.url();
    eventserver::admin::add_user(Path::new(&url), USER, PASSWORD).expect("add user");
    let (mut victim, a) = serve(Path::new(&url), &[], &[]);
    let (mut survivor, b) = serve(Path::new(&url), &[], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = (0..2).map(|_| Arc::default()).collect();
    let within = Duration::from_secs(20);
    // Two producers through each node; those on the victim stop when it is gone.
    let threads: Vec<(u64, JoinHandle<Published>)> = (0..4)
        .map(|t| {
            let (addr, on_victim) = if t % 2 == 0 { (a, true) } else { (b, false) };
            let tally = tallies[t as usize % 2].clone();
            let thread = publisher(addr, t, "load", within, on_victim, stop.clone(), tally);
            (t, thread)
        })
        .collect();
    wait_until(
        Duration::from_secs(60),
        "100 events through each node",
        || tallies.iter().all(|tally| tally.acknowledged() >= 100),
    );
    victim.kill9();
    let at_kill = tallies[1].acknowledged();
    wait_until(
        Duration::from_secs(60),
        "200 more through the survivor",
        || tallies[1].acknowledged() >= at_kill + 200,
    );
    stop.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for (t, thread) in threads {
        let published = thread.join().expect("publisher");
        assert_eq!(published.refused, [], "producer {t} (node {})", 1 + t % 2);
        acknowledged.extend(published.acknowledged.into_iter().map(|n| (t, n)));
    }
    assert!(survivor.alive(), "the survivor died");
    let stream = read_all(b, "load");
    assert_acknowledged_once_in_order(&stream, &acknowledged);
    survivor.stop();
}

/// Two nodes in process on a cluster of the test's own, one publisher through each, and
/// PostgreSQL taken away and brought back while they publish.
struct Outage {
    pg: Postgres,
    server: TestServer,
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    tallies: Vec<Arc<Tally>>,
    publishers: Vec<JoinHandle<Published>>,
    _heavy: std::sync::MutexGuard<'static, ()>,
}

/// Events published before an outage to a category of their own: more than memory keeps of
/// one (64), so a read of them all needs the store.
const HISTORY: usize = 100;

impl Outage {
    /// The nodes publishing; `None` as for [`Postgres::start_or_skip`].
    fn start(test: &str) -> Option<Outage> {
        let pg = Postgres::start_or_skip(test)?;
        let heavy = heavy();
        let server = TestServer::two_nodes_on(&pg.database("events"));
        let addrs = server.addrs();
        // More events than memory keeps of a category: reading them all needs the store.
        for n in 0..HISTORY {
            publish_ok(addrs[0], "history", &json!({ "n": n }));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tallies: Vec<Arc<Tally>> = (0..2).map(|_| Arc::default()).collect();
        let publishers = (0..2)
            .map(|t| {
                let (stop, tally) = (stop.clone(), tallies[t].clone());
                publisher(addrs[t], t as u64, "outage", NO_HANG, false, stop, tally)
            })
            .collect();
        Some(Outage {
            pg,
            server,
            addrs,
            stop,
            tallies,
            publishers,
            _heavy: heavy,
        })
    }

    /// Waits until each publisher has had `more` answers `of` a `kind`.
    fn both_have(&self, more: u64, kind: &str, of: fn(&Tally) -> u64) {
        let before: Vec<u64> = self.tallies.iter().map(|tally| of(tally)).collect();
        wait_until(Duration::from_secs(30), kind, || {
            let now = self.tallies.iter().map(|tally| of(tally));
            now.zip(&before).all(|(now, before)| now >= before + more)
        });
    }

    /// Waits until both nodes' `/healthz` answers `status`; each answer must come within
    /// [`NO_HANG`].
    fn healthz(&self, status: u16) {
        for addr in &self.addrs {
            wait_until(
                Duration::from_secs(30),
                &format!("/healthz {status}"),
                || {
                    let req = Req::new(*addr, "GET", "/healthz");
                    let resp = try_send(*addr, &req, NO_HANG).expect("/healthz answers");
                    resp.status == status
                },
            );
        }
    }

    /// Stops PostgreSQL (`pg_ctl stop -m MODE`) while both nodes take writes: waits for
    /// 503s through both and `/healthz` 503, starts it again, and waits for writes and
    /// `/healthz` to be 200 again. Every write is answered within [`NO_HANG`] throughout:
    /// what is not is a refusal that fails [`Outage::finish`].
    fn cycle(&self, mode: &str) {
        self.both_have(20, "writes through both nodes", Tally::acknowledged);
        self.healthz(200);
        self.pg.stop(mode);
        self.both_have(3, "503s through both nodes", Tally::refused);
        self.healthz(503);
        // Reads that need the database: a consumer's (its offset) and a subscriber's from
        // the start of time (more than memory holds of a category).
        for addr in &self.addrs {
            let reads = [
                consume_req(*addr, "outage", "c", "eventName=E&limit=1"),
                subscribe_req(*addr, "timeout=1&category=history&since_time=0"),
            ];
            for read in reads {
                let resp = try_send(*addr, &read, NO_HANG).expect("a read answers");
                assert_eq!(
                    resp.status,
                    503,
                    "a read while PostgreSQL is away: {}",
                    resp.text()
                );
            }
        }
        self.pg.restart();
        let again = format!("writes again after `pg_ctl stop -m {mode}`");
        self.both_have(20, &again, Tally::acknowledged);
        self.healthz(200);
    }

    /// Stops the publishers, asserts that each write they did not get a 200 for got a
    /// 503, and returns the `(publisher, n)` of every 200.
    fn finish(&mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        let mut acknowledged = Vec::new();
        for (t, thread) in self.publishers.drain(..).enumerate() {
            let published = thread.join().expect("publisher");
            let not_503: Vec<&(u64, String)> = published
                .refused
                .iter()
                .filter(|(_, why)| !why.starts_with("503 "))
                .collect();
            assert_eq!(not_503, [] as [&(u64, String); 0], "node {}", t + 1);
            acknowledged.extend(published.acknowledged.into_iter().map(|n| (t as u64, n)));
        }
        acknowledged
    }
}

#[test]
fn restarting_postgresql_under_load_answers_503_at_once_and_recovers_losing_nothing() {
    let test = "restarting_postgresql_under_load_answers_503_at_once_and_recovers_losing_nothing";
    let Some(mut outage) = Outage::start(test) else {
        return;
    };
    for mode in ["fast", "immediate"] {
        outage.cycle(mode);
    }
    let acknowledged = outage.finish();
    // Whether every read answers at once is the business of the next test: this one
    // reads back asking again while a page answers 503.
    let node = outage.addrs[0];
    let stream = read_all_with("outage", |query| {
        let mut resp = subscribe_req(node, query).send();
        wait_until(Duration::from_secs(30), "reads answer", || {
            if resp.status == 503 {
                resp = subscribe_req(node, query).send();
            }
            resp.status != 503
        });
        resp
    });
    assert_acknowledged_once_in_order(&stream, &acknowledged);
}

#[test]
fn once_postgresql_is_back_every_read_answers_200() {
    let test = "once_postgresql_is_back_every_read_answers_200";
    let Some(mut outage) = Outage::start(test) else {
        return;
    };
    for mode in ["fast", "immediate"] {
        outage.cycle(mode);
        // More reads than a node has workers: none may find its connection dead.
        for addr in &outage.addrs {
            for read in 0..12 {
                let query = "timeout=1&category=outage&since_time=0";
                let resp = subscribe_req(*addr, query).send();
                assert_eq!(
                    resp.status,
                    200,
                    "read {read} through {addr} after `pg_ctl stop -m {mode}`: {}",
                    resp.text()
                );
            }
        }
    }
    outage.finish();
}

#[test]
fn a_poll_parked_through_a_postgresql_restart_is_woken_by_an_append_through_the_other_node() {
    let test =
        "a_poll_parked_through_a_postgresql_restart_is_woken_by_an_append_through_the_other_node";
    // An outage each, so that the poll parks on a node that has not been through one.
    for mode in ["fast", "immediate"] {
        let Some(mut outage) = Outage::start(test) else {
            return;
        };
        let category = format!("after-{mode}");
        let query = format!("timeout=60&category={category}");
        let parked = answer_later(subscribe_req(outage.addrs[1], &query));
        wait_until(Duration::from_secs(10), "a poll parked on node 2", || {
            outage.server.parked() == 1
        });
        outage.cycle(mode);
        publish_ok(outage.addrs[0], &category, &json!({"t": 2, "n": 0}));
        let published = Instant::now();
        let what = format!("the poll parked through `pg_ctl stop -m {mode}`");
        let got = events(&woken(&parked, published, &what));
        assert_eq!(got.len(), 1, "{got:?}");
        outage.finish();
    }
}
