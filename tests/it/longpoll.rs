//! The long-poll API in golongpoll's wire format, over real HTTP: subscribe and
//! publish contracts byte for byte, event selection and paging, parking and timers, and the
//! one log the streams API shares.

use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::{
    PASSWORD, Req, Resp, TestServer, USER, append_ok, append_req, consume_req,
    expect_text_starting, publish_ok, publish_req, read_response, subscribe_req, wait_until,
};

const TIMEOUT_ERR: &str = r#"{"error": "Invalid or missing 'timeout' arg.  Must be 1-110."}"#;
const CATEGORY_ERR: &str =
    r#"{"error": "Invalid subscription category, must be 1-1024 characters long."}"#;
const SINCE_ERR: &str = r#"{"error": "Invalid 'since_time' arg."}"#;
const LAST_ID_NEEDS_SINCE: &str =
    r#"{"error": "Must provide 'since_time' arg when providing 'last_id'."}"#;
const LAST_ID_ERR: &str = r#"{"error": "Param 'last_id' was not a valid UUID."}"#;

const PUBLISHED: &str = r#"{"success": true}"#;
const METHOD_ERR: &str = r#"{"error": "Invalid HTTP Method. Only POST allowed."}"#;
const BODY_ERR: &str = r#"{"error": "Invalid POST body json."}"#;
const PUB_CATEGORY_ERR: &str =
    r#"{"error": "Invalid or missing 'category' arg, must be 1-1024 characters long."}"#;
const DATA_ERR: &str = r#"{"error": "Invalid or missing 'data' arg, must be non-nil."}"#;
const LOCKED_ERR: &str = r#"{"error": "Locked - Second writers not allowed"}"#;

/// How late an answer may come after its deadline.
const SLACK: Duration = Duration::from_secs(1);
/// Stack for the many polling threads: they only format a request and read an answer.
const POLLER_STACK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// One event of an events answer.
#[derive(Debug, Clone, PartialEq)]
struct Ev {
    ts: u64,
    category: String,
    data: Value,
    id: String,
}

/// Wall-clock milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Percent-encodes everything but unreserved characters.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Subscribes with `query` on a new connection.
fn subscribe(server: &TestServer, query: &str) -> Resp {
    subscribe_req(server, query).send()
}

/// The query resuming after `last` (or from the start of time).
fn resume_query(category: &str, timeout: u64, last: Option<&Ev>) -> String {
    match last {
        Some(e) => format!(
            "timeout={timeout}&category={}&since_time={}&last_id={}",
            enc(category),
            e.ts,
            e.id
        ),
        None => format!("timeout={timeout}&category={}&since_time=0", enc(category)),
    }
}

/// Asserts golongpoll's headers on a subscribe answer.
fn assert_subscribe_headers(resp: &Resp) {
    let expected = [
        ("Content-Type", "application/json"),
        ("X-Content-Type-Options", "nosniff"),
        ("Cache-Control", "no-cache, no-store, must-revalidate"),
        ("Pragma", "no-cache"),
        ("Expires", "0"),
    ];
    for (name, value) in expected {
        assert_eq!(
            resp.header(name),
            Some(value),
            "header {name} of {resp:?} ({})",
            resp.text()
        );
    }
}

/// Asserts a subscribe answer is the in-band error `body` (HTTP 200, byte for byte).
fn assert_sub_error(resp: &Resp, body: &str, query: &str) {
    assert_eq!(resp.status, 200, "status for {query:?}: {}", resp.text());
    assert_subscribe_headers(resp);
    assert_eq!(resp.text(), body, "body for {query:?}");
}

/// The events of an events answer, checking status, headers and shape.
fn events_of(resp: &Resp) -> Vec<Ev> {
    assert_eq!(resp.status, 200, "status: {}", resp.text());
    assert_subscribe_headers(resp);
    let body = resp.json();
    let obj = body.as_object().expect("answer is an object");
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        vec!["events"],
        "expected an events answer, got {}",
        resp.text()
    );
    let events = obj["events"].as_array().expect("events is an array");
    assert!(!events.is_empty(), "an events answer is never empty");
    events
        .iter()
        .map(|e| {
            let o = e.as_object().expect("event is an object");
            let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["category", "data", "id", "timestamp"], "event {e}");
            let id = o["id"].as_str().expect("id is a string").to_owned();
            let parsed = uuid::Uuid::parse_str(&id).expect("id is a UUID");
            assert_eq!(
                id,
                parsed.hyphenated().to_string(),
                "id is canonical lowercase"
            );
            Ev {
                ts: o["timestamp"].as_u64().expect("timestamp is an integer"),
                category: o["category"].as_str().expect("category").to_owned(),
                data: o["data"].clone(),
                id,
            }
        })
        .collect()
}

/// The timestamp of a timeout answer, checking status, headers and shape.
fn timeout_stamp(resp: &Resp) -> u64 {
    assert_eq!(resp.status, 200, "status: {}", resp.text());
    assert_subscribe_headers(resp);
    let body = resp.json();
    let obj = body.as_object().expect("answer is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["timeout", "timestamp"],
        "expected a timeout answer, got {}",
        resp.text()
    );
    assert_eq!(obj["timeout"], "no events before timeout");
    obj["timestamp"].as_u64().expect("timestamp is an integer")
}

/// Every event of `category` from the start of time, paging as a client would.
fn all_events(server: &TestServer, category: &str) -> Vec<Ev> {
    let mut conn = Conn::open(server.addr);
    let mut out: Vec<Ev> = Vec::new();
    loop {
        let resp = conn.send(&subscribe_req(
            server,
            &resume_query(category, 1, out.last()),
        ));
        if resp.json().get("timeout").is_some() {
            timeout_stamp(&resp);
            return out;
        }
        out.extend(events_of(&resp));
    }
}

/// The streams-API event these tests append: `name`, version 1, payload `{"n": 1}`.
fn streams_event(name: &str) -> Value {
    json!({"event": {"name": name, "version": 1}, "payload": {"n": 1}})
}

/// A keep-alive connection, for sending many requests fast.
struct Conn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(130)))
            .unwrap();
        Conn {
            addr,
            reader: BufReader::new(stream),
        }
    }

    /// Sends `req` without `Connection: close` and reads the answer.
    fn send(&mut self, req: &Req) -> Resp {
        self.reader
            .get_mut()
            .write_all(&req.clone().keep_alive().bytes())
            .expect("write request");
        let resp = read_response(&mut self.reader).expect("read response");
        if resp
            .header("Connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            *self = Conn::open(self.addr);
        }
        resp
    }
}

/// Publishes `data: {"n": i}` for `i` in `0..n` to `category` over `conns` concurrent
/// keep-alive connections.
fn publish_many(server: &TestServer, category: &str, n: usize, conns: usize) {
    let threads: Vec<JoinHandle<()>> = (0..conns)
        .map(|t| {
            let addr = server.next_addr();
            let category = category.to_owned();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                for i in (t..n).step_by(conns) {
                    let req = Req::new(addr, "POST", "/publish")
                        .auth(USER, PASSWORD)
                        .json(&json!({"category": category, "data": {"n": i}}));
                    let resp = conn.send(&req);
                    assert_eq!(resp.status, 200, "publish {i}: {}", resp.text());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("publisher");
    }
}

/// A poll running on its own thread (and connection).
struct Poll {
    sent: Instant,
    thread: JoinHandle<(Resp, Instant)>,
}

impl Poll {
    fn start(addr: SocketAddr, query: &str) -> Poll {
        let req = Req::new(addr, "GET", format!("/events?{query}")).auth(USER, PASSWORD);
        let sent = Instant::now();
        let thread = std::thread::Builder::new()
            .stack_size(POLLER_STACK)
            .spawn(move || {
                let resp = req.send();
                (resp, Instant::now())
            })
            .expect("spawn poller");
        Poll { sent, thread }
    }

    /// The answer and when it arrived.
    fn answer(self) -> (Resp, Instant) {
        self.thread.join().expect("poller thread")
    }
}

fn wait_parked(server: &TestServer, n: usize, within: Duration) {
    wait_until(within, &format!("{n} parked long-polls"), || {
        server.parked() == n
    });
}

/// `count` subscribers of `category`, each on a keep-alive connection of its own: past
/// `go`, each resumes from its last event until it has `n`, and returns the `n` of each
/// event it got, in order, and how many polls that took.
fn resuming_subscribers(
    server: &TestServer,
    category: &str,
    n: u64,
    count: usize,
    go: &Arc<Barrier>,
) -> Vec<JoinHandle<(Vec<u64>, usize)>> {
    let spawn = |_| {
        let (addr, go, category) = (server.next_addr(), go.clone(), category.to_owned());
        std::thread::Builder::new()
            .stack_size(POLLER_STACK)
            .spawn(move || {
                let mut conn = Conn::open(addr);
                let mut seen: Vec<Ev> = Vec::new();
                let mut rounds = 0;
                go.wait();
                while (seen.len() as u64) < n {
                    let query = resume_query(&category, 10, seen.last());
                    let req =
                        Req::new(addr, "GET", format!("/events?{query}")).auth(USER, PASSWORD);
                    seen.extend(events_of(&conn.send(&req)));
                    rounds += 1;
                }
                (seen.iter().map(n_of).collect(), rounds)
            })
            .expect("spawn subscriber")
    };
    (0..count).map(spawn).collect()
}

/// Asserts that an answer due `deadline` after its request came then, within [`SLACK`].
#[track_caller]
fn assert_answered_at(elapsed: Duration, deadline: Duration) {
    assert!(elapsed >= deadline, "answered early: {elapsed:?}");
    assert!(elapsed < deadline + SLACK, "answered late: {elapsed:?}");
}

/// Pages through `category` as a client resuming from its last event does, on one
/// keep-alive connection, until `n` events are in. Asserts that no answer holds more than
/// `batch`, that nothing follows the last event, and that the events are `{"n": 0..n}`
/// once each (no duplicate, no gap), oldest first. The events and the number of answers.
#[track_caller]
fn page_through(server: &TestServer, category: &str, n: usize, batch: usize) -> (Vec<Ev>, usize) {
    let mut conn = Conn::open(server.addr);
    let mut seen: Vec<Ev> = Vec::new();
    let mut pages = 0;
    while seen.len() < n {
        let query = resume_query(category, 5, seen.last());
        let events = events_of(&conn.send(&subscribe_req(server, &query)));
        assert!(
            events.len() <= batch,
            "{} > max batch {batch}",
            events.len()
        );
        pages += 1;
        seen.extend(events);
    }
    // Nothing more after the last one.
    timeout_stamp(&conn.send(&subscribe_req(
        server,
        &resume_query(category, 1, seen.last()),
    )));
    let ids: HashSet<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), n, "no duplicate");
    let ns: HashSet<u64> = seen.iter().map(n_of).collect();
    assert_eq!(ns, (0..n as u64).collect(), "no gap");
    assert!(seen.windows(2).all(|w| w[0].ts <= w[1].ts), "oldest first");
    (seen, pages)
}

/// The `n` of a `{"n": i}` datum.
fn n_of(e: &Ev) -> u64 {
    e.data["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("data {}", e.data))
}

// ---------------------------------------------------------------------------------------
// Subscribe: headers, errors, parameters
// ---------------------------------------------------------------------------------------

#[test]
fn every_subscribe_answer_has_golongpolls_headers_and_post_works_like_get() {
    let server = TestServer::start();
    // An error.
    let resp = subscribe(&server, "category=a");
    assert_sub_error(&resp, TIMEOUT_ERR, "category=a");
    // Events, with unknown parameters ignored.
    publish_ok(&server, "a", &json!("hello"));
    let resp = subscribe(
        &server,
        "timeout=5&category=a&since_time=0&foo=bar&callback=x",
    );
    let events = events_of(&resp);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data, json!("hello"));
    // POST answers exactly like GET.
    let resp = server
        .req("POST", "/events?timeout=5&category=a&since_time=0")
        .send();
    assert_eq!(events_of(&resp), events);
    let resp = server.req("POST", "/events?category=a").send();
    assert_sub_error(&resp, TIMEOUT_ERR, "POST category=a");
    // A timeout.
    let resp = subscribe(&server, "timeout=1&category=nothing&ignored=1");
    timeout_stamp(&resp);
}

#[test]
fn subscribe_errors_are_byte_exact_and_checked_in_order() {
    let server = TestServer::start();
    let long = "a".repeat(1025);
    let uuid = "7c17587a-3437-4861-bef7-8f29905589e4";
    let cases: Vec<(String, &str)> = vec![
        // timeout: missing, not an integer, out of range; it is checked first.
        ("".into(), TIMEOUT_ERR),
        ("category=a".into(), TIMEOUT_ERR),
        ("timeout=&category=a".into(), TIMEOUT_ERR),
        ("timeout=abc&category=a".into(), TIMEOUT_ERR),
        ("timeout=1.5&category=a".into(), TIMEOUT_ERR),
        ("timeout=-1&category=a".into(), TIMEOUT_ERR),
        ("timeout=0&category=a".into(), TIMEOUT_ERR),
        ("timeout=111&category=a".into(), TIMEOUT_ERR),
        (
            "timeout=99999999999999999999999&category=a".into(),
            TIMEOUT_ERR,
        ),
        (
            "timeout=0&category=&since_time=x&last_id=y".into(),
            TIMEOUT_ERR,
        ),
        // category: missing, empty, too long; before since_time.
        ("timeout=5".into(), CATEGORY_ERR),
        ("timeout=5&category=".into(), CATEGORY_ERR),
        (format!("timeout=5&category={long}"), CATEGORY_ERR),
        (
            "timeout=5&category=&since_time=x&last_id=y".into(),
            CATEGORY_ERR,
        ),
        // since_time not an integer; before last_id.
        ("timeout=5&category=a&since_time=x".into(), SINCE_ERR),
        ("timeout=5&category=a&since_time=1.5".into(), SINCE_ERR),
        ("timeout=5&category=a&since_time=12x".into(), SINCE_ERR),
        (
            "timeout=5&category=a&since_time=x&last_id=y".into(),
            SINCE_ERR,
        ),
        // last_id without since_time; before the UUID check.
        ("timeout=5&category=a&last_id=y".into(), LAST_ID_NEEDS_SINCE),
        (
            format!("timeout=5&category=a&last_id={uuid}"),
            LAST_ID_NEEDS_SINCE,
        ),
        (
            format!("timeout=5&category=a&since_time=&last_id={uuid}"),
            LAST_ID_NEEDS_SINCE,
        ),
        // last_id not a UUID.
        (
            "timeout=5&category=a&since_time=1&last_id=y".into(),
            LAST_ID_ERR,
        ),
        (
            "timeout=5&category=a&since_time=1&last_id=7c17587a-3437-4861-bef7-8f29905589e".into(),
            LAST_ID_ERR,
        ),
        (
            "timeout=5&category=a&since_time=1&last_id=7c17587a-3437-4861-bef7-8f29905589eg".into(),
            LAST_ID_ERR,
        ),
    ];
    for (query, body) in &cases {
        let resp = subscribe(&server, query);
        assert_sub_error(&resp, body, query);
        let resp = server.req("POST", &format!("/events?{query}")).send();
        assert_sub_error(&resp, body, &format!("POST {query}"));
    }
    assert_eq!(server.parked(), 0, "no error parks");
}

#[test]
fn timeout_error_names_the_configured_maximum() {
    let server = TestServer::start_with(|c| c.longpoll_max_timeout = 30);
    for query in [
        "category=a",
        "timeout=31&category=a",
        "timeout=0&category=a",
    ] {
        let resp = subscribe(&server, query);
        assert_sub_error(
            &resp,
            r#"{"error": "Invalid or missing 'timeout' arg.  Must be 1-30."}"#,
            query,
        );
    }
    // The maximum itself is accepted (answered at once: an event is waiting).
    publish_ok(&server, "a", &json!(1));
    let events = events_of(&subscribe(&server, "timeout=30&category=a&since_time=0"));
    assert_eq!(events.len(), 1);
    // Streams-API long-polls share the maximum.
    append_ok(&server, "s", "p1", &streams_event("a"));
    let resp = consume_req(&server, "s", "c", "eventName=zzz&limit=1&timeout=31").send();
    assert_eq!(resp.status, 400, "{}", resp.text());
}

#[test]
fn category_is_one_to_1024_bytes_and_query_decoding_follows_forms() {
    let server = TestServer::start();
    // 1024 bytes is fine on both ends, 1025 is not.
    let max = "c".repeat(1024);
    publish_ok(&server, &max, &json!("max"));
    let events = events_of(&subscribe(
        &server,
        &format!("timeout=5&category={max}&since_time=0"),
    ));
    assert_eq!(events[0].category, max);
    let over = "c".repeat(1025);
    let resp = publish_req(&server, &over, &json!(1)).send();
    assert_eq!(resp.status, 400);
    assert_eq!(resp.text(), PUB_CATEGORY_ERR);
    // Bytes, not characters: 512 two-byte characters fit, 513 do not.
    let wide = "é".repeat(512);
    publish_ok(&server, &wide, &json!("wide"));
    let events = events_of(&subscribe(
        &server,
        &format!("timeout=5&category={}&since_time=0", enc(&wide)),
    ));
    assert_eq!(events[0].category, wide);
    let wider = "é".repeat(513);
    let query = format!("timeout=5&category={}", enc(&wider));
    assert_sub_error(&subscribe(&server, &query), CATEGORY_ERR, &query);
    let resp = publish_req(&server, &wider, &json!(1)).send();
    assert_eq!(resp.text(), PUB_CATEGORY_ERR);
    // Go's url.Values encodes a space as '+'; percent escapes decode too.
    publish_ok(&server, "a b/ü", &json!("spaced"));
    for category in ["a+b%2F%C3%BC", "a%20b%2f%c3%bc"] {
        let events = events_of(&subscribe(
            &server,
            &format!("timeout=5&category={category}&since_time=0"),
        ));
        assert_eq!(events.len(), 1, "{category}");
        assert_eq!(events[0].category, "a b/ü");
        assert_eq!(events[0].data, json!("spaced"));
    }
}

#[test]
fn last_id_accepts_every_uuid_form() {
    let server = TestServer::start();
    publish_ok(&server, "u", &json!(0));
    publish_ok(&server, "u", &json!(1));
    let all = events_of(&subscribe(&server, "timeout=5&category=u&since_time=0"));
    assert_eq!(all.len(), 2);
    let (first, second) = (&all[0], &all[1]);
    let id = uuid::Uuid::parse_str(&first.id).unwrap();
    let simple = id.simple().to_string();
    let forms = [
        first.id.clone(),
        first.id.to_uppercase(),
        format!("{{{}}}", first.id),
        format!("{{{}}}", first.id.to_uppercase()),
        format!("urn:uuid:{}", first.id),
        format!("URN:UUID:{}", first.id.to_uppercase()),
        simple.clone(),
        simple.to_uppercase(),
    ];
    for form in forms {
        // At exactly the first event's timestamp, last_id must skip it and nothing more.
        let query = format!(
            "timeout=5&category=u&since_time={}&last_id={}",
            first.ts,
            enc(&form)
        );
        let resp = subscribe(&server, &query);
        let events = events_of(&resp);
        assert_eq!(
            events.first().map(|e| &e.id),
            Some(&second.id),
            "{form}: resumes right after the event it names"
        );
        assert!(events.iter().all(|e| e.id != first.id), "{form}");
    }
}

#[test]
fn empty_since_time_and_last_id_count_as_absent() {
    let server = TestServer::start();
    publish_ok(&server, "e", &json!("before"));
    // Absent since_time means "only new events": the earlier one is not an answer, so
    // these time out. (Were `since_time=` taken as 0, "before" would come back.)
    for query in [
        "timeout=1&category=e&since_time=&last_id=",
        "timeout=1&category=e&last_id=",
    ] {
        let resp = subscribe(&server, query);
        timeout_stamp(&resp);
    }
    // `last_id=` with a since_time is no last_id at all: every event after since_time.
    let events = events_of(&subscribe(
        &server,
        "timeout=5&category=e&since_time=0&last_id=",
    ));
    assert_eq!(events.len(), 1);
    // golongpoll takes any int64 since_time; one before the epoch means everything.
    let events = events_of(&subscribe(&server, "timeout=5&category=e&since_time=-1"));
    assert_eq!(events.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Answers and selection
// ---------------------------------------------------------------------------------------

#[test]
fn events_answer_has_golongpolls_shape_oldest_first() {
    let server = TestServer::start();
    let data = [
        json!("a string"),
        json!({"nested": {"list": [1, 2.5, null, true]}, "s": "q\"uote\\ \u{1F600}"}),
        json!(42),
        json!([1, "two"]),
        json!(false),
    ];
    let before = now_ms();
    for d in &data {
        publish_ok(&server, "shape", d);
    }
    let after = now_ms();
    let resp = subscribe(&server, "timeout=5&category=shape&since_time=0");
    // The raw body starts exactly as golongpoll writes it.
    assert!(
        resp.text().starts_with(r#"{"events":[{"timestamp":"#),
        "{}",
        resp.text()
    );
    let events = events_of(&resp);
    assert_eq!(events.len(), data.len());
    for (e, d) in events.iter().zip(&data) {
        assert_eq!(&e.data, d, "oldest first, data verbatim");
        assert_eq!(e.category, "shape");
        assert!(
            (before..=after + 1).contains(&e.ts),
            "timestamp {} is the commit time in ms ({before}..{after})",
            e.ts
        );
    }
    assert!(events.windows(2).all(|w| w[0].ts <= w[1].ts));
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "ids are unique");
}

#[test]
fn timeout_answer_comes_at_the_deadline_and_later_events_are_newer() {
    let server = TestServer::start();
    let sent = Instant::now();
    let resp = subscribe(&server, "timeout=1&category=t");
    let elapsed = sent.elapsed();
    let stamp = timeout_stamp(&resp);
    assert_answered_at(elapsed, Duration::from_secs(1));
    assert!(
        stamp.abs_diff(now_ms()) < 1000,
        "stamp {stamp} is server time"
    );
    // The Go client resumes from a timeout's timestamp: the next event must be after it.
    publish_ok(&server, "t", &json!("next"));
    let events = events_of(&subscribe(
        &server,
        &format!("timeout=5&category=t&since_time={stamp}"),
    ));
    assert_eq!(events.len(), 1);
    assert!(events[0].ts > stamp);
}

#[test]
fn without_since_time_only_later_events_are_answered() {
    let server = TestServer::start();
    publish_ok(&server, "n", &json!("old"));
    let poll = Poll::start(server.addr, "timeout=30&category=n");
    wait_parked(&server, 1, Duration::from_secs(10));
    publish_ok(&server, "n", &json!("new"));
    let (resp, _) = poll.answer();
    let events = events_of(&resp);
    assert_eq!(
        events.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        vec![json!("new")]
    );
}

#[test]
fn since_time_selects_strictly_newer_events() {
    let server = TestServer::start();
    let mut stamps = Vec::new();
    for i in 0..3 {
        if let Some(&last) = stamps.last() {
            wait_until(Duration::from_secs(2), "the clock to move on", || {
                now_ms() > last
            });
        }
        publish_ok(&server, "s", &json!(i));
        let all = events_of(&subscribe(&server, "timeout=5&category=s&since_time=0"));
        stamps.push(all.last().unwrap().ts);
    }
    assert!(stamps[0] < stamps[1] && stamps[1] < stamps[2], "{stamps:?}");
    let data = |since: u64| -> Vec<Value> {
        events_of(&subscribe(
            &server,
            &format!("timeout=5&category=s&since_time={since}"),
        ))
        .into_iter()
        .map(|e| e.data)
        .collect()
    };
    assert_eq!(data(stamps[0] - 1), vec![json!(0), json!(1), json!(2)]);
    assert_eq!(data(stamps[0]), vec![json!(1), json!(2)]);
    assert_eq!(data(stamps[1]), vec![json!(2)]);
    // At the newest timestamp there is nothing: the poll parks until its timeout.
    let resp = subscribe(
        &server,
        &format!("timeout=1&category=s&since_time={}", stamps[2]),
    );
    timeout_stamp(&resp);
}

#[test]
fn last_id_resumes_within_a_millisecond_and_an_unknown_id_means_all_of_it() {
    let server = TestServer::start();
    publish_many(&server, "m", 60, 12);
    let all = events_of(&subscribe(&server, "timeout=5&category=m&since_time=0"));
    assert_eq!(all.len(), 60);
    // Find a millisecond several events share (group commit stamps a batch at once).
    let start = (0..all.len() - 1)
        .find(|&i| all[i].ts == all[i + 1].ts)
        .expect("60 concurrent publishes share some millisecond");
    let t = all[start].ts;
    let at_or_after: Vec<&Ev> = all.iter().filter(|e| e.ts >= t).collect();
    let after: Vec<&Ev> = all.iter().filter(|e| e.ts > t).collect();
    // An id that is not among the events at T: all of T's events come back.
    let stranger = uuid::Uuid::new_v4();
    let got = events_of(&subscribe(
        &server,
        &format!("timeout=5&category=m&since_time={t}&last_id={stranger}"),
    ));
    assert_eq!(got.iter().collect::<Vec<_>>(), at_or_after);
    // The first event at T: the rest of T, then everything later.
    let got = events_of(&subscribe(
        &server,
        &format!(
            "timeout=5&category=m&since_time={t}&last_id={}",
            all[start].id
        ),
    ));
    assert_eq!(got.iter().collect::<Vec<_>>(), at_or_after[1..].to_vec());
    // Without last_id: strictly after T.
    if !after.is_empty() {
        let got = events_of(&subscribe(
            &server,
            &format!("timeout=5&category=m&since_time={t}"),
        ));
        assert_eq!(got.iter().collect::<Vec<_>>(), after);
    }
}

#[test]
fn a_burst_resumed_page_by_page_has_no_gap_and_no_duplicate() {
    const N: usize = 500;
    const BATCH: usize = 7;
    let server = TestServer::start_with(|c| c.longpoll_max_batch = BATCH);
    publish_many(&server, "burst", N, 16);
    let (seen, _) = page_through(&server, "burst", N, BATCH);
    let shared = seen.windows(2).filter(|w| w[0].ts == w[1].ts).count();
    assert!(
        shared > 0,
        "the burst exercised events sharing a millisecond"
    );
    // Paging agrees with the one-shot order.
    let mut fresh = Conn::open(server.addr);
    let first = events_of(&fresh.send(&subscribe_req(&server, &resume_query("burst", 5, None))));
    assert_eq!(first[..], seen[..first.len()]);
}

#[test]
fn max_batch_caps_one_answer_and_the_next_poll_continues() {
    let server = TestServer::start_with(|c| c.longpoll_max_batch = 3);
    for i in 0..5 {
        publish_ok(&server, "b", &json!({"n": i}));
    }
    let first = events_of(&subscribe(&server, &resume_query("b", 5, None)));
    assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [0, 1, 2]);
    let second = events_of(&subscribe(&server, &resume_query("b", 5, first.last())));
    assert_eq!(second.iter().map(n_of).collect::<Vec<_>>(), [3, 4]);
    // A parked poll woken by more events than the cap also gets at most the cap.
    let poll = Poll::start(server.addr, &resume_query("b", 30, second.last()));
    wait_parked(&server, 1, Duration::from_secs(10));
    publish_many(&server, "other", 1, 1);
    assert_eq!(server.parked(), 1, "another category does not wake it");
    // Up to 5 events in one commit; whatever the grouping, one answer holds at most 3.
    let before = all_events(&server, "b").len();
    assert_eq!(before, 5);
    std::thread::scope(|s| {
        for i in 5..10 {
            let server = &server;
            s.spawn(move || publish_ok(server, "b", &json!({"n": i})));
        }
    });
    let (resp, _) = poll.answer();
    let woken = events_of(&resp);
    assert!((1..=3).contains(&woken.len()), "{woken:?}");
    assert_eq!(all_events(&server, "b").len(), 10);
}

#[test]
fn pages_through_ten_thousand_events_from_since_time_zero() {
    let _turn = crate::support::heavy();
    const N: usize = 10_000;
    let server = TestServer::start();
    let started = Instant::now();
    publish_many(&server, "big", N, 32);
    let published = started.elapsed();
    // The default max batch is 250.
    let (_, pages) = page_through(&server, "big", N, 250);
    eprintln!(
        "published {N} in {published:?}, paged in {pages} answers in {:?}",
        started.elapsed() - published
    );
}

// ---------------------------------------------------------------------------------------
// Parking, waking, timers
// ---------------------------------------------------------------------------------------

#[test]
fn a_parked_poll_wakes_on_publish() {
    let server = TestServer::start();
    let poll = Poll::start(server.addr, "timeout=60&category=w");
    wait_parked(&server, 1, Duration::from_secs(10));
    let published = Instant::now();
    publish_ok(&server, "w", &json!({"hello": "world"}));
    let (resp, answered) = poll.answer();
    assert!(
        answered.duration_since(published) < Duration::from_secs(2),
        "woken at once, not at the deadline"
    );
    let events = events_of(&resp);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data, json!({"hello": "world"}));
    assert_eq!(events[0].category, "w");
    assert_eq!(server.parked(), 0);
}

#[test]
fn a_thousand_parked_polls_are_all_answered_by_one_event() {
    let _turn = crate::support::heavy();
    const POLLS: usize = 1000;
    let server = TestServer::start();
    // Warm the credential cache so the burst does not verify 1,000 hashes.
    assert_sub_error(&subscribe(&server, "category=x"), TIMEOUT_ERR, "warm-up");
    let polls: Vec<Poll> = (0..POLLS)
        .map(|_| Poll::start(server.addr, "timeout=100&category=fan"))
        .collect();
    wait_parked(&server, POLLS, Duration::from_secs(30));
    let published = Instant::now();
    publish_ok(&server, "fan", &json!("to everyone"));
    let mut ids = HashSet::new();
    let mut slowest = Duration::ZERO;
    for poll in polls {
        let (resp, answered) = poll.answer();
        let events = events_of(&resp);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, json!("to everyone"));
        ids.insert(events[0].id.clone());
        slowest = slowest.max(answered.saturating_duration_since(published));
    }
    assert_eq!(ids.len(), 1, "everyone got the same event");
    assert!(
        slowest < Duration::from_secs(10),
        "all answered promptly; slowest after {slowest:?}"
    );
    assert_eq!(server.parked(), 0);
}

#[test]
fn publishes_racing_parks_never_lose_an_event() {
    const N: u64 = 500;
    const SUBSCRIBERS: usize = 3;
    let server = TestServer::start();
    let go = Arc::new(Barrier::new(SUBSCRIBERS + 1));
    let subscribers = resuming_subscribers(&server, "race", N, SUBSCRIBERS, &go);
    go.wait();
    let mut conn = Conn::open(server.addr);
    for i in 0..N {
        let req = publish_req(&server, "race", &json!({"n": i}));
        let resp = conn.send(&req);
        assert_eq!(resp.text(), PUBLISHED);
    }
    for s in subscribers {
        let (seen, rounds) = s.join().expect("subscriber");
        assert_eq!(
            seen,
            (0..N).collect::<Vec<_>>(),
            "every event exactly once, in order"
        );
        assert!(
            rounds > 1,
            "the subscriber resumed while events were published"
        );
    }
}

#[test]
fn a_publish_racing_the_first_poll_of_a_category_is_never_lost() {
    // A category the registry does not know yet is read from the store and then parked:
    // an event committed between the two must still answer the poll. Each round races one
    // poll from the start of time against one publish on a fresh category.
    const LANES: usize = 4;
    const ROUNDS: usize = 300;
    let server = TestServer::start();
    let lanes: Vec<JoinHandle<()>> = (0..LANES)
        .map(|lane| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let go = Arc::new(Barrier::new(2));
                let publisher = {
                    let go = go.clone();
                    std::thread::spawn(move || {
                        let mut conn = Conn::open(addr);
                        for round in 0..ROUNDS {
                            let category = format!("fresh-{lane}-{round}");
                            let req = Req::new(addr, "POST", "/publish")
                                .auth(USER, PASSWORD)
                                .json(&json!({"category": category, "data": round}));
                            go.wait();
                            assert_eq!(conn.send(&req).text(), PUBLISHED);
                        }
                    })
                };
                let mut conn = Conn::open(addr);
                for round in 0..ROUNDS {
                    let query = format!("timeout=5&category=fresh-{lane}-{round}&since_time=0");
                    let req =
                        Req::new(addr, "GET", format!("/events?{query}")).auth(USER, PASSWORD);
                    go.wait();
                    let resp = conn.send(&req);
                    assert!(
                        resp.json().get("events").is_some(),
                        "round {round} of lane {lane} missed its event: {}",
                        resp.text()
                    );
                    let events = events_of(&resp);
                    assert_eq!(events.len(), 1);
                    assert_eq!(events[0].data, json!(round));
                }
                publisher.join().expect("publisher");
            })
        })
        .collect();
    for lane in lanes {
        lane.join().expect("lane");
    }
}

#[test]
fn timeouts_are_on_time_while_a_thousand_polls_leave_the_workers_free() {
    let _turn = crate::support::heavy();
    const POLLS: usize = 1000;
    const TIMEOUT: u64 = 4;
    let server = TestServer::start();
    assert_sub_error(&subscribe(&server, "category=x"), TIMEOUT_ERR, "warm-up");
    let polls: Vec<Poll> = (0..POLLS)
        .map(|i| Poll::start(server.addr, &format!("timeout={TIMEOUT}&category=idle{i}")))
        .collect();
    wait_parked(&server, POLLS, Duration::from_secs(TIMEOUT));
    let all_parked = Instant::now();
    // The workers are free: a streams-API request completes at once.
    let asked = Instant::now();
    let resp = consume_req(&server, "x", "c1", "eventName=a&limit=1").send();
    let took = asked.elapsed();
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert!(
        took < Duration::from_secs(1),
        "streams-API request took {took:?}"
    );
    let timeout = Duration::from_secs(TIMEOUT);
    for poll in polls {
        let sent = poll.sent;
        let (resp, answered) = poll.answer();
        timeout_stamp(&resp);
        assert!(
            answered.duration_since(sent) >= timeout,
            "answered before its deadline"
        );
        // Every poll was parked (deadline fixed) by `all_parked`.
        assert!(
            answered <= all_parked + timeout + SLACK,
            "answered {:?} after its latest possible deadline",
            answered.saturating_duration_since(all_parked + timeout)
        );
    }
    assert_eq!(server.parked(), 0);
}

#[test]
fn the_parked_cap_answers_503_beyond_it() {
    let server = TestServer::start_with(|c| c.max_parked = 5);
    let polls: Vec<Poll> = (0..5)
        .map(|_| Poll::start(server.addr, "timeout=100&category=cap"))
        .collect();
    wait_parked(&server, 5, Duration::from_secs(10));
    let resp = subscribe(&server, "timeout=100&category=cap");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.json().get("error").is_some(), "{}", resp.text());
    assert_eq!(server.parked(), 5);
    // Released slots can be parked in again.
    publish_ok(&server, "cap", &json!("free"));
    for poll in polls {
        assert_eq!(events_of(&poll.answer().0)[0].data, json!("free"));
    }
    let again = Poll::start(server.addr, "timeout=1&category=cap");
    timeout_stamp(&again.answer().0);
}

#[test]
fn shutdown_answers_every_parked_poll_at_once() {
    let mut server = TestServer::start();
    let polls: Vec<Poll> = (0..8)
        .map(|i| Poll::start(server.addr, &format!("timeout=100&category=down{}", i % 2)))
        .collect();
    wait_parked(&server, 8, Duration::from_secs(10));
    let handle = server.handle.take().expect("running");
    let stopping = Instant::now();
    let stopper = std::thread::spawn(move || handle.shutdown());
    for poll in polls {
        let (resp, answered) = poll.answer();
        timeout_stamp(&resp);
        assert!(
            answered.duration_since(stopping) < Duration::from_secs(3),
            "answered {:?} after shutdown began",
            answered.duration_since(stopping)
        );
    }
    stopper.join().expect("shutdown");
}

// ---------------------------------------------------------------------------------------
// Re-polls answered from memory
// ---------------------------------------------------------------------------------------

/// A user removed by an operator keeps polling only while its credentials are cached
/// (`--auth-cache-secs`), then is refused.
#[test]
fn a_removed_user_is_refused_once_its_cached_credentials_expire() {
    let ttl = Duration::from_secs(1);
    let server = TestServer::start_with(|c| c.auth_cache_ttl = ttl);
    publish_ok(&server, "cached", &json!({"n": 0}));
    let cached_at = Instant::now();
    let all = events_of(&subscribe(&server, &resume_query("cached", 5, None)));
    eventserver::admin::remove_user(&server.db, USER).expect("remove the user");
    let again = events_of(&subscribe(&server, &resume_query("cached", 5, None)));
    if cached_at.elapsed() < ttl {
        assert_eq!(
            again, all,
            "within the cache's lifetime the old credentials pass"
        );
    }
    wait_until(Duration::from_secs(5), "the cache entry to expire", || {
        cached_at.elapsed() > ttl
    });
    let refused = subscribe_req(&server, &resume_query("cached", 5, all.last())).send();
    assert_eq!(refused.status, 401, "{}", refused.text());
}

#[test]
fn many_subscribers_re_polling_get_every_event_exactly_once() {
    const N: u64 = 300;
    const SUBSCRIBERS: usize = 24;
    let server = TestServer::start();
    publish_ok(&server, "many", &json!({"n": 0}));
    let go = Arc::new(Barrier::new(SUBSCRIBERS + 1));
    let subscribers = resuming_subscribers(&server, "many", N, SUBSCRIBERS, &go);
    go.wait();
    // Paced in bursts, so that subscribers both park and find events waiting.
    let mut conn = Conn::open(server.addr);
    for i in 1..N {
        let resp = conn.send(&publish_req(&server, "many", &json!({"n": i})));
        assert_eq!(resp.text(), PUBLISHED);
        if i % 10 == 0 {
            let parked = Instant::now();
            while server.parked() < SUBSCRIBERS / 2 && parked.elapsed() < Duration::from_millis(200)
            {
                std::thread::yield_now();
            }
        }
    }
    for s in subscribers {
        let (seen, _) = s.join().expect("subscriber");
        assert_eq!(
            seen,
            (0..N).collect::<Vec<_>>(),
            "every event once, in order"
        );
    }
}

/// For every kind of resume point (`since_time` before, at and after each event's
/// millisecond, with no `last_id`, that event's id, another id of the same millisecond or
/// an unknown one), memory answers exactly what the store answers: the same server's
/// answers from memory, then, after a restart emptied it, from the store. 100 events, so
/// the oldest are beyond the tail memory keeps and those polls go to the store both times.
#[test]
fn answers_from_memory_match_answers_from_the_store() {
    let mut server = TestServer::start();
    publish_many(&server, "same", 100, 8);
    let all = all_events(&server, "same");
    assert_eq!(all.len(), 100);
    let newest = all.last().expect("events").ts;
    let stranger = uuid::Uuid::new_v4();
    let mut queries = Vec::new();
    for (i, e) in all.iter().enumerate() {
        let mut lasts = vec![
            String::new(),
            format!("&last_id={}", e.id),
            format!("&last_id={stranger}"),
        ];
        if let Some(n) = all[i + 1..].iter().find(|n| n.ts == e.ts) {
            lasts.push(format!("&last_id={}", n.id));
        }
        // Past the newest event a poll would wait; memory leaves those to the store.
        for since in [e.ts.saturating_sub(1), e.ts, e.ts + 1].map(|t| t.min(newest - 1)) {
            for last in &lasts {
                queries.push(format!("timeout=1&category=same&since_time={since}{last}"));
            }
        }
    }
    queries.sort();
    queries.dedup();
    let answers = |server: &TestServer| -> Vec<Vec<Ev>> {
        let mut conn = Conn::open(server.addr);
        let answers = queries
            .iter()
            .map(|q| events_of(&conn.send(&subscribe_req(server, q))));
        answers.collect()
    };
    let warm = answers(&server);
    // A restart empties memory: every poll after it is answered by the store.
    server.restart();
    let cold = answers(&server);
    for ((query, warm), cold) in queries.iter().zip(&warm).zip(&cold) {
        assert_eq!(warm, cold, "{query}");
    }
}

// ---------------------------------------------------------------------------------------
// Publish
// ---------------------------------------------------------------------------------------

#[test]
fn publish_answers_success_once_durable() {
    let mut server = TestServer::start();
    // Content-Type is optional; unknown fields are ignored.
    let resp = server
        .req("POST", "/publish")
        .body(r#"{"category":"d","data":{"k":[1,2]},"extra":"ignored"}"#)
        .send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), PUBLISHED);
    let before = all_events(&server, "d");
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].data, json!({"k": [1, 2]}));
    server.restart();
    assert_eq!(all_events(&server, "d"), before, "durable across a restart");
}

#[test]
fn publish_errors_are_byte_exact() {
    let server = TestServer::start();
    let check = |resp: Resp, status: u16, body: &str, what: &str| {
        assert_eq!(resp.status, status, "{what}: {}", resp.text());
        assert_eq!(resp.text(), body, "{what}");
        assert_eq!(
            resp.header("Content-Type"),
            Some("application/json"),
            "{what}"
        );
        assert_eq!(
            resp.header("X-Content-Type-Options"),
            Some("nosniff"),
            "{what}"
        );
    };
    check(server.req("GET", "/publish").send(), 405, METHOD_ERR, "GET");
    check(
        server.req("GET", "/publish?category=a&data=1").send(),
        405,
        METHOD_ERR,
        "GET with query",
    );
    for body in [
        "",
        "not json",
        r#"{"category": "a", "data": "#,
        "\"a\"",
        "7",
    ] {
        check(
            server.req("POST", "/publish").body(body).send(),
            400,
            BODY_ERR,
            &format!("body {body:?}"),
        );
    }
    let long = "a".repeat(1025);
    for body in [
        json!({"data": 1}),
        json!({"category": "", "data": 1}),
        json!({"category": null, "data": 1}),
        json!({"category": long, "data": 1}),
    ] {
        check(
            server.req("POST", "/publish").json(&body).send(),
            400,
            PUB_CATEGORY_ERR,
            &format!("body {body}"),
        );
    }
    for body in [
        json!({"category": "a"}),
        json!({"category": "a", "data": null}),
    ] {
        check(
            server.req("POST", "/publish").json(&body).send(),
            400,
            DATA_ERR,
            &format!("body {body}"),
        );
    }
    // Nothing was stored by any of them.
    timeout_stamp(&subscribe(&server, "timeout=1&category=a&since_time=0"));
    // Falsy but non-null data is data.
    for data in [json!(0), json!(""), json!(false), json!([]), json!({})] {
        publish_ok(&server, "a", &data);
    }
    assert_eq!(all_events(&server, "a").len(), 5);
}

#[test]
fn a_publish_body_that_is_not_an_object_is_invalid_json() {
    // golongpoll decodes the body into its PublishData struct: an array does not decode,
    // whatever it holds.
    let server = TestServer::start();
    for body in ["[]", r#"["a"]"#, r#"["a", 1]"#] {
        let resp = server.req("POST", "/publish").body(body).send();
        assert_eq!(resp.status, 400, "body {body:?}: {}", resp.text());
        assert_eq!(resp.text(), BODY_ERR, "body {body:?}");
    }
    timeout_stamp(&subscribe(&server, "timeout=1&category=a&since_time=0"));
}

#[test]
fn publish_obeys_the_single_writer_rule() {
    let server = TestServer::start();
    let locked = |resp: Resp, what: &str| {
        assert_eq!(resp.status, 423, "{what}: {}", resp.text());
        assert_eq!(resp.text(), LOCKED_ERR, "{what}");
        assert_eq!(resp.header("Content-Type"), Some("application/json"));
        assert_eq!(resp.header("X-Content-Type-Options"), Some("nosniff"));
    };
    append_ok(&server, "owned", "p1", &streams_event("a"));
    locked(
        publish_req(&server, "owned", &json!(1)).send(),
        "no producer",
    );
    locked(
        publish_req(&server, "owned", &json!(2))
            .header("X-Producer-ID", "p2")
            .send(),
        "another producer",
    );
    let resp = publish_req(&server, "owned", &json!(3))
        .header("X-Producer-ID", "p1")
        .send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), PUBLISHED);
    let data: Vec<Value> = all_events(&server, "owned")
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(
        data.len(),
        2,
        "only the owner's publish was stored: {data:?}"
    );
    assert_eq!(data[1], json!(3));
}

#[test]
fn a_publish_with_a_producer_id_claims_an_unowned_stream() {
    let server = TestServer::start();
    let resp = publish_req(&server, "claimed", &json!(1))
        .header("X-Producer-ID", "p9")
        .send();
    assert_eq!(resp.text(), PUBLISHED);
    let resp = append_req(&server, "claimed", "p1", &streams_event("a")).send();
    assert_eq!(resp.status, 423, "{}", resp.text());
    assert_eq!(resp.json(), json!("Locked - Second writers not allowed"));
    let resp = publish_req(&server, "claimed", &json!(2)).send();
    assert_eq!(resp.status, 423);
    assert_eq!(resp.text(), LOCKED_ERR);
    append_ok(&server, "claimed", "p9", &streams_event("a"));
}

#[test]
fn a_publish_without_a_producer_id_does_not_claim() {
    let server = TestServer::start();
    publish_ok(&server, "free", &json!(1));
    publish_ok(&server, "free", &json!(2));
    // Still unowned: any producer may claim it.
    append_ok(&server, "free", "p1", &streams_event("a"));
    let resp = publish_req(&server, "free", &json!(3)).send();
    assert_eq!(resp.status, 423, "now p1 owns it: {}", resp.text());
    assert_eq!(resp.text(), LOCKED_ERR);
}

// ---------------------------------------------------------------------------------------
// One log, two views
// ---------------------------------------------------------------------------------------

#[test]
fn streams_api_events_reach_long_poll_subscribers() {
    let server = TestServer::start();
    append_ok(&server, "orders", "p1", &streams_event("Warmup"));
    let poll = Poll::start(server.addr, "timeout=60&category=orders");
    wait_parked(&server, 1, Duration::from_secs(10));
    let id = append_ok(&server, "orders", "p1", &streams_event("OrderPlaced"));
    let (resp, _) = poll.answer();
    let events = events_of(&resp);
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event.id, id, "id is the streams-API event id");
    assert_eq!(event.category, "orders");
    // data is exactly the element a streams-API consumer reads.
    let resp = consume_req(&server, "orders", "c1", "eventName=OrderPlaced&limit=10").send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let elements = resp.json();
    assert_eq!(elements.as_array().map(Vec::len), Some(1), "{elements}");
    assert_eq!(event.data, elements[0]);
    assert_eq!(event.data["eventId"], json!(id));
    assert_eq!(event.data["event"]["name"], json!("OrderPlaced"));
    // The same through since_time paging.
    let all = all_events(&server, "orders");
    assert_eq!(all.len(), 2);
    assert_eq!(&all[1], event);
}

#[test]
fn published_events_are_invisible_to_streams_api_reads_by_name() {
    let server = TestServer::start();
    // A stream nobody wrote to does not exist.
    let resp = consume_req(&server, "pubonly", "c1", "eventName=a&limit=10").send();
    assert_eq!(resp.status, 404, "{}", resp.text());
    // Written only through /publish: it exists, and has nothing by any name.
    publish_ok(&server, "pubonly", &json!({"event": {"name": "a"}}));
    for name in ["a", "OrderPlaced", "x"] {
        let resp = consume_req(
            &server,
            "pubonly",
            "c1",
            &format!("eventName={name}&limit=10"),
        )
        .send();
        assert_eq!(resp.status, 200, "{name}: {}", resp.text());
        assert_eq!(resp.text(), "[]", "{name}");
    }
    // Mixed: streams-API readers see only the named element.
    let id = append_ok(&server, "mixed", "p1", &streams_event("a"));
    let resp = publish_req(
        &server,
        "mixed",
        &json!({"eventId": "fake", "event": {"name": "a"}}),
    )
    .header("X-Producer-ID", "p1")
    .send();
    assert_eq!(resp.text(), PUBLISHED);
    let resp = consume_req(&server, "mixed", "c1", "eventName=a&limit=10").send();
    let elements = resp.json();
    assert_eq!(elements.as_array().map(Vec::len), Some(1), "{elements}");
    assert_eq!(elements[0]["eventId"], json!(id));
    assert_eq!(all_events(&server, "mixed").len(), 2, "long-poll sees both");
}

#[test]
fn streams_api_consumers_long_poll_until_the_deadline() {
    let server = TestServer::start();
    append_ok(&server, "lp", "p1", &streams_event("other"));
    let sent = Instant::now();
    let resp = consume_req(&server, "lp", "c1", "eventName=a&limit=5&timeout=1").send();
    let elapsed = sent.elapsed();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "[]");
    assert_answered_at(elapsed, Duration::from_secs(1));
    // Events already waiting are answered at once.
    let id = append_ok(&server, "lp", "p1", &streams_event("a"));
    let sent = Instant::now();
    let resp = consume_req(&server, "lp", "c1", "eventName=a&limit=5&timeout=30").send();
    assert!(sent.elapsed() < Duration::from_secs(2));
    assert_eq!(resp.json()[0]["eventId"], json!(id));
}

#[test]
fn streams_api_long_poll_wakes_only_for_its_event_name() {
    let server = TestServer::start();
    append_ok(&server, "lw", "p1", &streams_event("first"));
    let req = consume_req(&server, "lw", "c1", "eventName=wanted&limit=5&timeout=60");
    let waiter = std::thread::spawn(move || {
        let resp = req.send();
        (resp, Instant::now())
    });
    wait_parked(&server, 1, Duration::from_secs(10));
    // Another name, and a /publish without a name, do not wake it.
    append_ok(&server, "lw", "p1", &streams_event("unwanted"));
    let resp = publish_req(&server, "lw", &json!(1))
        .header("X-Producer-ID", "p1")
        .send();
    assert_eq!(resp.text(), PUBLISHED);
    assert_eq!(server.parked(), 1, "still waiting");
    let published = Instant::now();
    let id = append_ok(&server, "lw", "p1", &streams_event("wanted"));
    let (resp, answered) = waiter.join().unwrap();
    assert!(answered.duration_since(published) < Duration::from_secs(2));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let elements = resp.json();
    assert_eq!(elements.as_array().map(Vec::len), Some(1), "{elements}");
    assert_eq!(elements[0]["eventId"], json!(id));
    assert_eq!(elements[0]["event"]["name"], json!("wanted"));
}

#[test]
fn streams_api_long_poll_timeout_must_be_in_range() {
    let server = TestServer::start();
    append_ok(&server, "r", "p1", &streams_event("a"));
    for timeout in ["0", "111", "-1", "x", ""] {
        let resp = consume_req(
            &server,
            "r",
            "c1",
            &format!("eventName=b&limit=1&timeout={timeout}"),
        )
        .send();
        assert_eq!(resp.status, 400, "timeout={timeout}: {}", resp.text());
        expect_text_starting(&resp, "Bad Request - ");
    }
    // 110 is fine (answered at once: the event is there).
    let resp = consume_req(&server, "r", "c1", "eventName=a&limit=1&timeout=110").send();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json().as_array().map(Vec::len), Some(1));
}

// ---------------------------------------------------------------------------------------
// Auth, restart
// ---------------------------------------------------------------------------------------

#[test]
fn missing_or_wrong_credentials_get_401_with_a_challenge() {
    let requests = [
        ("GET", "/events?timeout=1&category=a"),
        ("POST", "/events?timeout=1&category=a"),
        ("GET", "/events"),
        ("POST", "/publish"),
        ("GET", "/publish"),
    ];
    let server = TestServer::start();
    let body = json!({"category": "a", "data": 1});
    for (method, path) in requests {
        for req in [
            server.anon(method, path),
            server.anon(method, path).auth(USER, "wrong"),
            server.anon(method, path).auth("nobody", PASSWORD),
        ] {
            let resp = req.json(&body).send();
            assert_eq!(resp.status, 401, "{method} {path}: {}", resp.text());
            let challenge = resp.header("WWW-Authenticate").unwrap_or_default();
            assert!(
                challenge.starts_with("Basic"),
                "{method} {path}: {challenge:?}"
            );
        }
    }
    assert_eq!(server.parked(), 0);
    timeout_stamp(&subscribe(&server, "timeout=1&category=a&since_time=0"));
}

#[test]
fn ids_and_timestamps_survive_a_restart() {
    let mut server = TestServer::start();
    publish_ok(&server, "keep", &json!("one"));
    publish_ok(&server, "keep", &json!({"two": 2}));
    append_ok(&server, "keep", "p1", &streams_event("three"));
    let resp = publish_req(&server, "keep", &json!(4))
        .header("X-Producer-ID", "p1")
        .send();
    assert_eq!(resp.text(), PUBLISHED);
    let before = all_events(&server, "keep");
    assert_eq!(before.len(), 4);
    let raw_before = subscribe(&server, "timeout=5&category=keep&since_time=0").body;
    server.restart();
    let raw_after = subscribe(&server, "timeout=5&category=keep&since_time=0").body;
    assert_eq!(
        String::from_utf8_lossy(&raw_after),
        String::from_utf8_lossy(&raw_before),
        "the same answer, byte for byte"
    );
    let last = before.last().unwrap();
    // Resuming from before the restart: only the new event, no older one again.
    let poll = Poll::start(server.addr, &resume_query("keep", 30, Some(last)));
    wait_parked(&server, 1, Duration::from_secs(10));
    let resp = publish_req(&server, "keep", &json!(5))
        .header("X-Producer-ID", "p1")
        .send();
    assert_eq!(resp.text(), PUBLISHED);
    let events = events_of(&poll.answer().0);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data, json!(5));
    assert!(events[0].ts >= last.ts, "timestamps never decrease");
    // The ownership survived too.
    let resp = publish_req(&server, "keep", &json!(6)).send();
    assert_eq!(resp.status, 423);
}

/// A parked poll's connection sends nothing while it waits, so the read timeout runs on it
/// too: a poll within it keeps its keep-alive connection, one that outlasts it gets its
/// answer and then the connection closes. The default read timeout outlasts the longest
/// poll allowed, so with defaults no poll loses its connection.
#[test]
fn a_poll_keeps_its_connection_unless_it_outlasts_the_read_timeout() {
    let defaults = eventserver::Config::new("unused.db");
    assert!(defaults.read_timeout > Duration::from_secs(defaults.longpoll_max_timeout));
    for (read_timeout, kept) in [(4, true), (1, false)] {
        let server = TestServer::start_with(|c| c.read_timeout = Duration::from_secs(read_timeout));
        let mut conn = Conn::open(server.addr);
        let resp = conn.send(&server.req("GET", "/events?category=quiet&timeout=2"));
        assert_eq!(resp.status, 200);
        // (`Conn::send` would reconnect quietly after a `Connection: close`.)
        assert_eq!(resp.header("Connection"), None);
        assert_eq!(resp.json()["timeout"], "no events before timeout");
        // A second request on the same connection: answered, or the connection is gone.
        let again = server.req("GET", "/healthz").bytes();
        let answered = conn.reader.get_mut().write_all(&again).is_ok()
            && read_response(&mut conn.reader).is_ok_and(|r| r.status == 200);
        assert_eq!(answered, kept, "read timeout {read_timeout} s");
    }
}

/// A client that hangs up while its poll is parked gives up its place under the
/// parked-poll cap within seconds, not at the poll's deadline; a client still connected
/// keeps waiting.
#[test]
fn a_poll_whose_client_hangs_up_is_released() {
    let server = TestServer::start();
    let poll = |category: &str| {
        let mut stream = TcpStream::connect(server.addr).expect("connect");
        let req = server.req("GET", &format!("/events?category={category}&timeout=100"));
        stream.write_all(&req.bytes()).expect("send the poll");
        stream
    };
    let gone = poll("gone");
    let stays = poll("stays");
    wait_parked(&server, 2, Duration::from_secs(5));
    drop(gone);
    wait_parked(&server, 1, Duration::from_secs(10));
    let mut stays = BufReader::new(stays);
    publish_ok(&server, "stays", &json!("still here"));
    let resp = read_response(&mut stays).expect("the connected client's answer");
    assert_eq!(resp.json()["events"][0]["data"], json!("still here"));
}

/// A client that half-closes its connection (`shutdown(Write)`) while its poll is parked is
/// released the same way, within seconds, and reads the timeout answer on the half it
/// kept open.
#[test]
fn a_poll_whose_client_half_closes_is_released_and_answered() {
    let server = TestServer::start();
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    let req = server.req("GET", "/events?category=half&timeout=100");
    stream.write_all(&req.bytes()).expect("send the poll");
    wait_parked(&server, 1, Duration::from_secs(5));
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    // Far short of the poll's 100 s: only a release answers within this.
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let resp = read_response(&mut BufReader::new(stream)).expect("the answer, released");
    timeout_stamp(&resp);
    assert_eq!(server.parked(), 0);
}

/// A client whose poll has been parked a while, that resets its connection and at once
/// connects again from the same port (the kernel may hand a reset connection's port out
/// again straight away), is served on the new connection within seconds. The bug: answers
/// are ordered per client address and port, so the new connection's answers waited behind
/// the old connection's parked poll, which was never released while that address looked
/// connected, until its deadline.
#[test]
fn a_client_reconnecting_from_a_reset_connections_port_is_not_held_behind_its_old_poll() {
    use socket2::{Domain, SockAddr, Socket, Type};
    let server = TestServer::start();
    let connect = |from: &SockAddr| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket.bind(from).expect("bind the client's port");
        socket.connect(&server.addr.into()).expect("connect");
        socket
    };
    let poll = |socket: &Socket, category: &str| {
        let req = server.req("GET", &format!("/events?category={category}&timeout=100"));
        socket.send(&req.bytes()).expect("send the poll");
    };
    let reset = |socket: Socket| {
        socket.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    };
    let any_port = SockAddr::from(SocketAddr::from(([127, 0, 0, 1], 0)));
    let old = connect(&any_port);
    poll(&old, "reused");
    wait_parked(&server, 1, Duration::from_secs(5));
    // A poll parked after it, from a connection that resets, is released only by a look
    // for gone clients begun after both parked: one that saw the old connection.
    let marker = connect(&any_port);
    poll(&marker, "marker");
    wait_parked(&server, 2, Duration::from_secs(5));
    reset(marker);
    wait_parked(&server, 1, Duration::from_secs(15));
    let port = old.local_addr().expect("the client's address");
    reset(old);
    let mut new = TcpStream::from(connect(&port));
    new.write_all(&server.req("GET", "/healthz").bytes())
        .expect("send a request on the new connection");
    // Far short of the old poll's 100 s.
    new.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let resp = read_response(&mut BufReader::new(new)).expect("an answer on the new connection");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(server.parked(), 0);
}

/// A server too busy to queue a long-poll request refuses it with 503 in golongpoll's error
/// shape, as the README promises, not with a bare string.
#[test]
fn overload_is_refused_in_the_long_poll_error_shape() {
    // One worker, one place in the queue, and requests that each cost an argon2 check.
    let server = TestServer::start_with(|c| {
        c.workers = 1;
        c.queue = 1;
    });
    let barrier = Arc::new(Barrier::new(32));
    let polls: Vec<JoinHandle<Resp>> = (0..32)
        .map(|_| {
            let req = Req::new(server.addr, "GET", "/events?category=x&timeout=1")
                .auth(USER, "not the password");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                req.send()
            })
        })
        .collect();
    let answers: Vec<Resp> = polls.into_iter().map(|p| p.join().unwrap()).collect();
    let busy: Vec<&Resp> = answers.iter().filter(|r| r.status == 503).collect();
    assert!(!busy.is_empty(), "no request was refused");
    for resp in busy {
        assert_eq!(
            resp.json(),
            json!({"error": "Service Unavailable - server is busy"})
        );
    }
}
