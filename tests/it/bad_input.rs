//! Bad input: a table of malformed requests, each sent raw on its own connection
//! to one server, each expecting a specific answer, and each followed by a check that the
//! server still serves.
//!
//! Expected answers come from the contracts: the streams API answers 400
//! `"Bad Request - …"` (401 before anything else when credentials are bad, 413 for bodies
//! over the limit); the long-poll subscribe answers 200 with `{"error": …}`; publish 400
//! with `{"error": …}`. Some requests never reach eventserver: tiny_http answers a request
//! line or header it cannot parse with an empty 400 and closes, and closes without any
//! answer when a head holds bytes that are not ASCII or the body ends early. Those rows say
//! so.
//!
//! Every malformed write targets the stream `bad` (publishes: the category `badpub`), which
//! must not exist when the table is done: nothing malformed is ever stored.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{
    JSON_UTF8, Outcome, PASSWORD, Req, TestServer, USER, append_ok, event, exchange, send_within,
    wait_until,
};

/// The read timeout of the server under test: rows that hold a connection open are cut
/// after it.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a row may take to be answered (or closed).
const PATIENCE: Duration = Duration::from_secs(6);
const BODY_LIMIT: usize = 1 << 20;

/// After writing the request, the client…
#[derive(Clone, Copy, Debug, PartialEq)]
enum Then {
    /// keeps its side open and waits for the answer;
    Wait,
    /// closes its sending side (the server sees the end of the stream).
    HalfClose,
}

/// Sends `bytes` on a new connection and reads what comes back within [`PATIENCE`], or the
/// test fails.
fn outcome(addr: SocketAddr, bytes: Vec<u8>, half_close: bool) -> Outcome {
    try_exchange(addr, bytes, half_close).unwrap_or_else(|e| panic!("{e}"))
}

/// [`exchange`] within [`PATIENCE`]; `Err` says what went wrong.
fn try_exchange(addr: SocketAddr, bytes: Vec<u8>, half_close: bool) -> Result<Outcome, String> {
    exchange(addr, bytes, PATIENCE, half_close).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("neither an answer nor a close within {PATIENCE:?}")
        }
        _ => format!("a broken answer: {e}"),
    })
}

// ---------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------

/// The answer a row expects.
#[derive(Clone, Debug)]
enum Expect {
    /// A streams-API answer: this status and a JSON string starting with this text.
    Text(u16, &'static str),
    /// A long-poll answer: this status and exactly `{"error": "<message>"}`.
    Error(u16, &'static str),
    /// 200 from the long-poll subscribe with events.
    Events,
    /// 200 from the long-poll subscribe with the timeout answer.
    TimedOut,
    /// Only this status (tiny_http's own empty answers, or a route's success).
    Status(u16),
    /// The connection is closed without an answer.
    Closed,
}

struct Case {
    name: String,
    request: Vec<u8>,
    then: Then,
    expect: Expect,
    /// Whether the outcome may only come after the server's read timeout.
    after_read_timeout: bool,
}

fn case(name: impl Into<String>, request: &Req, expect: Expect) -> Case {
    Case {
        name: name.into(),
        request: request.bytes(),
        then: Then::Wait,
        expect,
        after_read_timeout: false,
    }
}

fn raw_case(name: impl Into<String>, request: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        request: request.into(),
        then: Then::Wait,
        expect,
        after_read_timeout: false,
    }
}

impl Case {
    fn half_close(mut self) -> Case {
        self.then = Then::HalfClose;
        self
    }

    fn slow(mut self) -> Case {
        self.after_read_timeout = true;
        self
    }
}

/// Checks one outcome; `Err` says what was wrong.
fn check(expect: &Expect, outcome: &Outcome) -> Result<(), String> {
    let resp = match (expect, outcome) {
        (Expect::Closed, Outcome::Closed) => return Ok(()),
        (Expect::Closed, Outcome::Answer(r)) => {
            return Err(format!("expected a close, got {} {}", r.status, r.text()));
        }
        (_, Outcome::Closed) => return Err("closed without an answer".into()),
        (_, Outcome::Answer(r)) => r,
    };
    let want = match expect {
        Expect::Text(s, _) | Expect::Error(s, _) | Expect::Status(s) => *s,
        Expect::Events | Expect::TimedOut => 200,
        Expect::Closed => unreachable!(),
    };
    if resp.status != want {
        return Err(format!(
            "status {} ({}), expected {want}",
            resp.status,
            resp.text()
        ));
    }
    if resp.status == 401 && resp.header("WWW-Authenticate") != Some("Basic realm=\"eventserver\"")
    {
        return Err("a 401 without the Basic challenge".into());
    }
    match expect {
        Expect::Text(_, prefix) => {
            if resp.header("Content-Type") != Some(JSON_UTF8) {
                return Err(format!("Content-Type {:?}", resp.header("Content-Type")));
            }
            match serde_json::from_slice::<Value>(&resp.body) {
                Ok(Value::String(text)) if text.starts_with(prefix) => Ok(()),
                _ => Err(format!(
                    "body {}, expected a JSON string starting {prefix:?}",
                    resp.text()
                )),
            }
        }
        Expect::Error(_, message) => {
            if serde_json::from_slice::<Value>(&resp.body).ok() == Some(json!({ "error": message }))
            {
                Ok(())
            } else {
                Err(format!(
                    "body {}, expected {{\"error\": {message:?}}}",
                    resp.text()
                ))
            }
        }
        Expect::Events | Expect::TimedOut => {
            let body: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
            let key = if matches!(expect, Expect::Events) {
                "events"
            } else {
                "timeout"
            };
            if body.get(key).is_some() {
                Ok(())
            } else {
                Err(format!("body {}, expected a {key:?} answer", resp.text()))
            }
        }
        Expect::Status(_) | Expect::Closed => Ok(()),
    }
}

/// Whether the server answers a plain request at once.
fn serving(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let raw = Req::raw("GET", "/healthz").bytes();
    match outcome(addr, raw, false) {
        Outcome::Answer(r) if r.status == 200 && Instant::now() < deadline => Ok(()),
        other => Err(format!("the server stopped serving: {other:?}")),
    }
}

/// Runs every case against `server`, collecting all failures before failing.
fn run_table(server: &TestServer, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in &cases {
        let started = Instant::now();
        let outcome = try_exchange(
            server.addr,
            case.request.clone(),
            case.then == Then::HalfClose,
        );
        let took = started.elapsed();
        let mut verdict = outcome.and_then(|outcome| check(&case.expect, &outcome));
        if verdict.is_ok() && case.after_read_timeout && took < READ_TIMEOUT.mul_f32(0.8) {
            verdict = Err(format!("came after {took:?}, before the read timeout"));
        }
        if verdict.is_ok() && !case.after_read_timeout && took > READ_TIMEOUT.mul_f32(0.8) {
            verdict = Err(format!("took {took:?}: it waited for the read timeout"));
        }
        if let Err(why) = verdict.and_then(|()| serving(server.addr)) {
            failures.push(format!("{}: {why}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} malformed requests went wrong:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

fn start() -> TestServer {
    TestServer::start_with(|c| c.read_timeout = READ_TIMEOUT)
}

// ---------------------------------------------------------------------------------------
// Request builders for the table
// ---------------------------------------------------------------------------------------

const BAD_REQUEST: Expect = Expect::Text(400, "Bad Request - ");
const UNAUTHORIZED: Expect = Expect::Text(401, "Unauthorized");
const INVALID_JSON: Expect = Expect::Error(400, "Invalid POST body json.");
const BAD_CATEGORY_PUBLISH: Expect = Expect::Error(
    400,
    "Invalid or missing 'category' arg, must be 1-1024 characters long.",
);
const BAD_CATEGORY: Expect = Expect::Error(
    200,
    "Invalid subscription category, must be 1-1024 characters long.",
);
const BAD_TIMEOUT: Expect = Expect::Error(200, "Invalid or missing 'timeout' arg.  Must be 1-110.");
const BAD_SINCE: Expect = Expect::Error(200, "Invalid 'since_time' arg.");

/// A producer's append to stream `bad`.
fn append(stream: &str) -> Req {
    Req::raw("POST", format!("/api/v1/streams/{stream}/events"))
        .auth(USER, PASSWORD)
        .header("X-Producer-ID", "p")
        .header("Content-Type", "application/json")
}

/// An append of a valid event to stream `bad` that declares `length` as its length.
fn declaring(length: impl AsRef<[u8]>) -> Req {
    append("bad")
        .header("Content-Length", length)
        .no_length()
        .body(valid_event())
}

fn valid_event() -> Vec<u8> {
    br#"{"event":{"name":"a"}}"#.to_vec()
}

/// A consumer's read of stream `s` with the query `query`.
fn consume(query: &str) -> Req {
    Req::raw("GET", format!("/api/v1/streams/s/events?{query}"))
        .auth(USER, PASSWORD)
        .header("X-Consumer-ID", "c")
}

fn ack(stream: &str, id: &str) -> Req {
    Req::raw("POST", format!("/api/v1/streams/{stream}/events/{id}"))
        .auth(USER, PASSWORD)
        .header("X-Consumer-ID", "c")
        .header("Content-Type", "application/x-www-form-urlencoded")
}

fn subscribe(query: &str) -> Req {
    Req::raw("GET", format!("/events?{query}")).auth(USER, PASSWORD)
}

fn publish(body: impl Into<Vec<u8>>) -> Req {
    Req::raw("POST", "/publish")
        .auth(USER, PASSWORD)
        .header("Content-Type", "application/json")
        .body(body)
}

/// A chunked append of stream `bad` whose body (chunks and all) is `chunks`.
fn chunked(chunks: &[u8]) -> Vec<u8> {
    let mut bytes = append("bad")
        .header("Transfer-Encoding", "chunked")
        .no_length()
        .bytes();
    bytes.extend_from_slice(chunks);
    bytes
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Runs a table of malformed writes: [`run_table`], then [`assert_nothing_stored`].
fn run_write_table(server: &TestServer, cases: Vec<Case>) {
    run_table(server, cases);
    assert_nothing_stored(server);
}

/// After a table: stream `bad` was never created, by any case.
fn assert_nothing_stored(server: &TestServer) {
    let resp = server
        .req("GET", "/api/v1/streams/bad/events?eventName=a&limit=10")
        .header("X-Consumer-ID", "c")
        .send();
    assert_eq!(
        resp.status,
        404,
        "a malformed write created stream 'bad': {}",
        resp.text()
    );
    for category in ["bad", "badpub"] {
        let resp = server
            .req(
                "GET",
                &format!("/events?category={category}&timeout=1&since_time=0"),
            )
            .send();
        assert!(
            resp.json().get("timeout").is_some(),
            "a malformed write reached category '{category}': {}",
            resp.text()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The tables
// ---------------------------------------------------------------------------------------

#[test]
fn malformed_request_lines_and_headers() {
    let server = start();
    // tiny_http answers a request line or header it cannot parse with an empty 400.
    let unparsable = [
        ("a word and nothing else", "GARBAGE\r\n\r\n"),
        ("no HTTP version", "GET /healthz\r\n\r\n"),
        ("an unknown HTTP version", "GET /healthz HTTP/9.9\r\n\r\n"),
        (
            "two spaces in the request line",
            "GET  /healthz HTTP/1.1\r\n\r\n",
        ),
        ("an empty request line", "\r\n\r\n"),
        (
            "a header line without a colon",
            "GET /healthz HTTP/1.1\r\nNoColonHere\r\n\r\n",
        ),
        (
            "a header name with a space",
            "GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ),
    ];
    let mut cases: Vec<Case> = unparsable
        .into_iter()
        .map(|(name, head)| raw_case(name, head, Expect::Status(400)))
        .collect();
    cases.extend([
        // The path reaches the router; it is no route.
        case(
            "a NUL byte in the path",
            &Req::raw("GET", "/heal\0thz"),
            Expect::Text(404, "Not Found"),
        ),
        // tiny_http reads heads as ASCII and closes on anything else, without an answer.
        case(
            "a raw non-ASCII byte in the path",
            &Req::raw("GET", b"/api/v1/streams/\xff/events?eventName=a&limit=1"),
            Expect::Closed,
        ),
        case(
            "a raw non-ASCII byte in a header",
            &Req::raw("GET", "/healthz").header("X-Note", b"caf\xc3\xa9"),
            Expect::Closed,
        ),
        raw_case(
            "a TLS ClientHello on the plain port",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xff\xfe\r\n\r\n".to_vec(),
            Expect::Closed,
        ),
        // Lines must end in CRLF; a head with bare LFs never ends, so it is cut.
        raw_case(
            "bare LF line endings",
            "GET /healthz HTTP/1.1\nHost: x\n\n",
            Expect::Closed,
        )
        .slow(),
        // tiny_http has no limit on the header section: a large one is simply served. Its
        // memory cost is measured in abuse.rs (`a_64_mib_header_line_keeps_memory_bounded`).
        case(
            "a 1 MiB header section (128 headers of 8 KiB)",
            &(0..128).fold(Req::raw("GET", "/healthz"), |r, i| {
                r.header(&format!("X-Filler-{i}"), "x".repeat(8192))
            }),
            Expect::Status(200),
        ),
        case(
            "a 1 MiB header value",
            &Req::raw("GET", "/healthz").header("X-Filler", "x".repeat(1 << 20)),
            Expect::Status(200),
        ),
        case(
            "an Expect header tiny_http does not know",
            &Req::raw("GET", "/healthz").header("Expect", "coffee"),
            Expect::Status(417),
        ),
    ]);
    run_table(&server, cases);
}

#[test]
fn bodies_over_the_limit_and_lying_lengths() {
    let server = start();
    let over = vec![b' '; BODY_LIMIT + 1];
    let mut cases = vec![
        case(
            "a streams-API body one byte over the limit",
            &append("bad").body(over.clone()),
            Expect::Text(413, "Payload Too Large - limit is 1048576 bytes"),
        ),
        case(
            "a publish body one byte over the limit",
            &publish(over.clone()),
            Expect::Error(413, "Payload Too Large - limit is 1048576 bytes"),
        ),
        case(
            "a body over the limit without credentials",
            &Req::raw("POST", "/api/v1/streams/bad/events")
                .header("X-Producer-ID", "p")
                .body(over.clone()),
            UNAUTHORIZED,
        ),
        case(
            "a declared 2^64 - 1 byte body",
            &declaring(u64::MAX.to_string()),
            Expect::Text(413, "Payload Too Large - "),
        ),
        // RFC 9112 §6.3: differing Content-Length fields are an unrecoverable error.
        case(
            "two Content-Length headers that disagree",
            &declaring("22").header("Content-Length", "12"),
            BAD_REQUEST,
        ),
        // A body shorter than declared, then the end of the stream: tiny_http reads short
        // bodies (up to 1 KiB) itself and closes without an answer.
        case(
            "a short body under 1 KiB, then the client closes",
            &declaring("100"),
            Expect::Closed,
        )
        .half_close(),
        // A longer declared body is read by eventserver: a complete-looking JSON prefix
        // must not pass for the whole body.
        case(
            "a short body over 1 KiB, then the client closes",
            &declaring("5000"),
            BAD_REQUEST,
        )
        .half_close(),
        case(
            "a short publish body over 1 KiB, then the client closes",
            &publish(br#"{"category":"badpub","data":1}"#.to_vec())
                .header("Content-Length", "5000")
                .no_length(),
            INVALID_JSON,
        )
        .half_close(),
        // The same with the connection held open: cut after the read timeout.
        case(
            "a short body under 1 KiB, connection held",
            &declaring("100"),
            Expect::Closed,
        )
        .slow(),
        case(
            "a short body over 1 KiB, connection held",
            &declaring("5000"),
            Expect::Text(400, "Bad Request - could not read the request body"),
        )
        .slow(),
    ];
    let declared = "a declared 100 GB body (never read)";
    cases.push(case(
        declared,
        &declaring("100000000000"),
        Expect::Text(413, "Payload Too Large - "),
    ));
    // A length that does not parse is no length: the body is empty.
    let unparsed = [
        ("a negative Content-Length", "-22"),
        ("a non-numeric Content-Length", "twenty-two"),
        ("an exponent Content-Length", "2.2e1"),
        (
            "a Content-Length overflowing 64 bits",
            "18446744073709551638",
        ),
        ("a Content-Length shorter than the body", "12"),
    ];
    cases.extend(unparsed.map(|(name, length)| case(name, &declaring(length), BAD_REQUEST)));
    run_write_table(&server, cases);
}

#[test]
fn broken_chunked_bodies() {
    let server = start();
    let event = valid_event();
    let good = [
        format!("{:x}\r\n", event.len()).into_bytes(),
        event.clone(),
        b"\r\n0\r\n\r\n".to_vec(),
    ]
    .concat();
    let mut over = Vec::new();
    for _ in 0..=(BODY_LIMIT / 4096) {
        over.extend_from_slice(b"1000\r\n");
        over.extend_from_slice(&[b' '; 4096]);
        over.extend_from_slice(b"\r\n");
    }
    over.extend_from_slice(b"0\r\n\r\n");
    const UNREADABLE: Expect = Expect::Text(400, "Bad Request - could not read the request body");
    let broken: [(&str, &[u8]); 5] = [
        ("a chunk size that is not hex", b"zz\r\n{}\r\n0\r\n\r\n"),
        (
            "a negative chunk size",
            b"-16\r\n{\"event\":{\"name\":\"a\"}}\r\n0\r\n\r\n",
        ),
        (
            "a chunk size overflowing 64 bits",
            b"1ffffffffffffffff\r\n{}\r\n0\r\n\r\n",
        ),
        ("an empty chunk-size line", b"\r\n{}\r\n0\r\n\r\n"),
        ("chunk data without its CRLF", b"2\r\n{}0\r\n\r\n"),
    ];
    let mut cases: Vec<Case> = broken
        .into_iter()
        .map(|(name, chunks)| raw_case(name, chunked(chunks), UNREADABLE))
        .collect();
    // Bodies that stop short while the connection stays open are cut after the read timeout.
    let held: [(&str, &[u8]); 2] = [
        (
            "a chunk longer than what is sent",
            b"ffff\r\n{\"event\":{\"name\":\"a\"}}",
        ),
        ("a body without its last chunk", &good[..good.len() - 5]),
    ];
    cases.extend(held.into_iter().map(|(name, chunks)| {
        raw_case(
            format!("{name}, connection held"),
            chunked(chunks),
            UNREADABLE,
        )
        .slow()
    }));
    cases.push(raw_case(
        "chunks adding up to more than the limit",
        chunked(&over),
        Expect::Text(413, "Payload Too Large - limit is 1048576 bytes"),
    ));
    // Publish answers in golongpoll's shape: a body that cannot be read is not JSON.
    for (what, chunks) in [
        ("not hex", &b"zz\r\n{}\r\n0\r\n\r\n"[..]),
        ("overflowing", b"1ffffffffffffffff\r\n{}\r\n0\r\n\r\n"),
        ("without the chunk's CRLF", b"2\r\n{}0\r\n\r\n"),
    ] {
        let mut request = publish(Vec::new())
            .header("Transfer-Encoding", "chunked")
            .no_length()
            .bytes();
        request.extend_from_slice(chunks);
        cases.push(raw_case(
            format!("publish: a chunk size {what}"),
            request,
            INVALID_JSON,
        ));
    }
    cases.push(
        case(
            "publish: a short body over 1 KiB, connection held",
            &publish(br#"{"category":"badpub","data":1}"#.to_vec())
                .header("Content-Length", "5000")
                .no_length(),
            INVALID_JSON,
        )
        .slow(),
    );
    run_write_table(&server, cases);
    // The same framing with a good body is accepted: the rows above failed for their errors.
    let outcome = outcome(server.addr, chunked(&good), false);
    check(&Expect::Status(200), &outcome).unwrap();
}

/// A chunked body cut short by the end of the stream is not a body.
#[test]
#[ignore = "stock tiny_http 0.12 (chunked_transfer 1.5) reports the end of the stream inside a \
            chunk as the end of the body, so eventserver cannot tell a cut body from a whole one: \
            the truncated event is stored (200)"]
fn a_chunked_body_cut_short_by_the_client_is_not_stored() {
    let server = start();
    let outcome = outcome(
        server.addr,
        chunked(b"ffff\r\n{\"event\":{\"name\":\"a\"}}"),
        true,
    );
    check(&BAD_REQUEST, &outcome).unwrap();
    assert_nothing_stored(&server);
}

#[test]
fn invalid_utf8_and_control_characters() {
    let server = start();
    append_ok(&server, "s", "p", &event("a"));
    let stream_names = [
        ("a percent-encoded byte that is not UTF-8", "bad%ff"),
        ("a truncated UTF-8 sequence", "bad%C3%28"),
        ("an encoded surrogate", "bad%ED%A0%80"),
        ("a malformed escape", "bad%zz"),
        ("an escape cut short at the end", "bad%4"),
        ("1025 bytes", &"b".repeat(1025)),
    ];
    let mut cases: Vec<Case> = stream_names
        .into_iter()
        .map(|(what, stream)| {
            let name = format!("{what} in a stream name");
            case(name, &append(stream).body(valid_event()), BAD_REQUEST)
        })
        .collect();
    let producer_ids = [
        ("with a tab", "a\tb".to_owned()),
        ("with a DEL", "a\x7fb".to_owned()),
        ("empty", String::new()),
        ("of 256 bytes", "p".repeat(256)),
    ];
    cases.extend(producer_ids.into_iter().map(|(what, id)| {
        let request = Req::raw("POST", "/api/v1/streams/bad/events")
            .auth(USER, PASSWORD)
            .header("X-Producer-ID", id)
            .body(valid_event());
        case(format!("a producer id {what}"), &request, BAD_REQUEST)
    }));
    cases.extend([
        case(
            "a percent-encoded non-UTF-8 eventName",
            &consume("eventName=%ff&limit=1"),
            BAD_REQUEST,
        ),
        case(
            "a raw non-ASCII byte in the query",
            &Req::raw("GET", b"/api/v1/streams/s/events?eventName=\xff&limit=1")
                .auth(USER, PASSWORD)
                .header("X-Consumer-ID", "c"),
            Expect::Closed,
        ),
        case(
            "a non-UTF-8 category",
            &subscribe("category=%ff&timeout=1"),
            BAD_CATEGORY,
        ),
        case(
            "a body that is not UTF-8",
            &append("bad").body(b"{\"event\":{\"name\":\"\xff\"}}".to_vec()),
            BAD_REQUEST,
        ),
        case(
            "a body in UTF-16",
            &append("bad").body(
                "{\"event\":{\"name\":\"a\"}}"
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes)
                    .collect::<Vec<u8>>(),
            ),
            BAD_REQUEST,
        ),
        case(
            "a publish body that is not UTF-8",
            &publish(b"{\"category\":\"bad\",\"data\":\"\xff\"}".to_vec()),
            INVALID_JSON,
        ),
        case(
            "an ACK body that is not UTF-8",
            &ack("s", &uuid::Uuid::new_v4().to_string()).body(b"action=ACK\xff".to_vec()),
            BAD_REQUEST,
        ),
        case(
            "an ACK action that decodes to no UTF-8",
            &ack("s", &uuid::Uuid::new_v4().to_string()).body("action=%ff"),
            BAD_REQUEST,
        ),
        case(
            "a consumer id with a control character",
            &Req::raw("GET", "/api/v1/streams/s/events?eventName=a&limit=1")
                .auth(USER, PASSWORD)
                .header("X-Consumer-ID", "c\x01"),
            BAD_REQUEST,
        ),
        case(
            "a NUL in an event id",
            &ack("s", "%00").body("action=ACK"),
            BAD_REQUEST,
        ),
        case(
            "a control character in a publish category",
            &publish(br#"{"category":"bad\u0000","data":1}"#.to_vec()),
            BAD_CATEGORY_PUBLISH,
        ),
        case(
            "a newline in a publish category",
            &publish(br#"{"category":"bad\n","data":1}"#.to_vec()),
            BAD_CATEGORY_PUBLISH,
        ),
        case(
            "a publish producer id with a control character",
            &publish(br#"{"category":"badpub","data":1}"#.to_vec())
                .header("X-Producer-ID", "p\x01"),
            Expect::Error(
                400,
                "Invalid 'X-Producer-ID' header, must be 1-255 bytes without control characters.",
            ),
        ),
    ]);
    // Every encoded control character (C0, DEL, C1) in a stream name and a category.
    for control in [
        "%00", "%01", "%09", "%0A", "%0D", "%1B", "%1F", "%7F", "%C2%80", "%C2%85", "%C2%9F",
    ] {
        cases.push(case(
            format!("{control} in a stream name (append)"),
            &append(&format!("bad{control}")).body(valid_event()),
            BAD_REQUEST,
        ));
        cases.push(case(
            format!("{control} in a stream name (read)"),
            &Req::raw(
                "GET",
                format!("/api/v1/streams/s{control}/events?eventName=a&limit=1"),
            )
            .auth(USER, PASSWORD)
            .header("X-Consumer-ID", "c"),
            BAD_REQUEST,
        ));
        cases.push(case(
            format!("{control} in a category"),
            &subscribe(&format!("category=bad{control}&timeout=1")),
            BAD_CATEGORY,
        ));
    }
    run_write_table(&server, cases);
}

#[test]
fn extreme_numbers_and_duplicated_parameters() {
    let server = start();
    append_ok(&server, "s", "p", &event("a"));
    let published = server
        .req("POST", "/publish")
        .json(&json!({"category": "dup", "data": 1}))
        .send();
    assert_eq!(published.status, 200, "{}", published.text());
    let mut cases = Vec::new();
    for limit in [
        "0",
        "-1",
        "1001",
        "1e3",
        "1.0",
        "0x10",
        "%201",
        "18446744073709551616",
        "99999999999999999999999999999999",
        "",
    ] {
        cases.push(case(
            format!("limit={limit}"),
            &consume(&format!("eventName=a&limit={limit}")),
            BAD_REQUEST,
        ));
    }
    for timeout in ["0", "-1", "111", "1e1", "1.5", "18446744073709551617", ""] {
        cases.push(case(
            format!("streams-API timeout={timeout}"),
            &consume(&format!("eventName=a&limit=1&timeout={timeout}")),
            BAD_REQUEST,
        ));
        if !timeout.is_empty() {
            cases.push(case(
                format!("long-poll timeout={timeout}"),
                &subscribe(&format!("category=dup&timeout={timeout}")),
                BAD_TIMEOUT,
            ));
        }
    }
    for since in [
        "1e3",
        "1.5",
        "0x10",
        "9223372036854775808",
        "-9223372036854775809",
        "99999999999999999999999",
        "now",
    ] {
        cases.push(case(
            format!("since_time={since}"),
            &subscribe(&format!("category=dup&timeout=1&since_time={since}")),
            BAD_SINCE,
        ));
    }
    // The extremes that are integers: before the epoch means everything, the far future
    // means nothing yet.
    cases.push(case(
        "since_time=i64::MIN",
        &subscribe("category=dup&timeout=1&since_time=-9223372036854775808"),
        Expect::Events,
    ));
    cases.push(
        case(
            "since_time=i64::MAX",
            &subscribe("category=dup&timeout=1&since_time=9223372036854775807"),
            Expect::TimedOut,
        )
        .slow(),
    );
    cases.push(
        case(
            "since_time=i64::MAX with a last_id",
            &subscribe(&format!(
                "category=dup&timeout=1&since_time=9223372036854775807&last_id={}",
                uuid::Uuid::new_v4()
            )),
            Expect::TimedOut,
        )
        .slow(),
    );
    // The streams API wants each parameter once.
    for query in [
        "eventName=a&eventName=b&limit=1",
        "eventName=a&limit=1&limit=2",
        "eventName=a&limit=1&timeout=1&timeout=2",
        "eventName=a&eventName=a&limit=1",
    ] {
        cases.push(case(
            format!("duplicated: {query}"),
            &consume(query),
            BAD_REQUEST,
        ));
    }
    cases.push(case(
        "duplicated action in an ACK body",
        &ack("s", &uuid::Uuid::new_v4().to_string()).body("action=ACK&action=NACK"),
        BAD_REQUEST,
    ));
    // The long-poll API reads the first value, as golongpoll (Go's Query().Get) does.
    cases.push(case(
        "long-poll: the first timeout wins (invalid)",
        &subscribe("category=dup&timeout=zz&timeout=1"),
        BAD_TIMEOUT,
    ));
    cases.push(case(
        "long-poll: the first value of each parameter wins (valid)",
        &subscribe("category=dup&category=&timeout=1&timeout=zz&since_time=0&since_time=x"),
        Expect::Events,
    ));
    run_table(&server, cases);
}

#[test]
fn deep_and_huge_json() {
    let server = start();
    let deep = nested(100_000);
    let open_only = "[".repeat(100_000);
    let cases = vec![
        case(
            "100,000 [ and nothing else",
            &append("bad").body(open_only.clone()),
            BAD_REQUEST,
        ),
        case(
            "an array nested 100,000 deep as the body",
            &append("bad").body(deep.clone()),
            BAD_REQUEST,
        ),
        case(
            "an object nested 100,000 deep as the body",
            &append("bad").body(format!(
                "{}{}",
                "{\"a\":".repeat(100_000),
                "}".repeat(100_000)
            )),
            BAD_REQUEST,
        ),
        case(
            "an event object holding an array nested 100,000 deep",
            &append("bad").body(format!(r#"{{"event":{{"name":"a","x":{deep}}}}}"#)),
            BAD_REQUEST,
        ),
        // Valid JSON, but deeper than any reader downstream takes (serde_json's limit is 128,
        // Go's encoding/json 10,000): stored, it would poison every consumer of the stream.
        case(
            "a payload nested 100,000 deep",
            &append("bad").body(format!(r#"{{"event":{{"name":"a"}},"payload":{deep}}}"#)),
            BAD_REQUEST,
        ),
        case(
            "a system object holding an array nested 100,000 deep",
            &append("bad").body(format!(
                r#"{{"event":{{"name":"a"}},"system":{{"x":{deep}}}}}"#
            )),
            BAD_REQUEST,
        ),
        case(
            "publish data nested 100,000 deep",
            &publish(format!(r#"{{"category":"badpub","data":{deep}}}"#)),
            INVALID_JSON,
        ),
        case(
            "publish: 100,000 [ and nothing else",
            &publish(open_only),
            INVALID_JSON,
        ),
        case(
            "an unterminated huge string",
            &append("bad").body(format!(
                r#"{{"event":{{"name":"a"}},"payload":"{}"#,
                "x".repeat(1_000_000)
            )),
            BAD_REQUEST,
        ),
        case(
            "a huge string with a bad escape at its end",
            &append("bad").body(format!(
                r#"{{"event":{{"name":"a"}},"payload":"{}\q"}}"#,
                "x".repeat(1_000_000)
            )),
            BAD_REQUEST,
        ),
        case(
            "a huge event name that is not a string",
            &append("bad").body(format!(
                r#"{{"event":{{"name":{}}}}}"#,
                "9".repeat(1_000_000)
            )),
            BAD_REQUEST,
        ),
    ];
    run_write_table(&server, cases);
}

/// Huge valid strings under the limit are stored and come back exactly as posted.
#[test]
fn huge_json_strings_under_the_limit_round_trip() {
    let server = start();
    let big = "x".repeat(1_000_000);
    let escapes = "\\u00e9\\n".repeat(100_000);
    for (stream, body) in [
        (
            "big",
            format!(r#"{{"event":{{"name":"a"}},"payload":"{big}"}}"#),
        ),
        (
            "escaped",
            format!(r#"{{"event":{{"name":"a"}},"payload":"{escapes}"}}"#),
        ),
        (
            "named",
            format!(r#"{{"event":{{"name":"{}"}}}}"#, "n".repeat(500_000)),
        ),
    ] {
        assert!(body.len() <= BODY_LIMIT);
        let posted: Value = serde_json::from_str(&body).unwrap();
        let resp = server
            .req("POST", &format!("/api/v1/streams/{stream}/events"))
            .header("X-Producer-ID", "p")
            .body(body)
            .send();
        assert_eq!(resp.status, 200, "{stream}: {}", resp.text());
        let name = posted["event"]["name"].as_str().unwrap();
        let got = send_within(
            server.addr,
            &server
                .req(
                    "GET",
                    &format!("/api/v1/streams/{stream}/events?eventName={name}&limit=1"),
                )
                .header("X-Consumer-ID", "c"),
            PATIENCE,
        );
        assert_eq!(got.status, 200, "{stream}");
        let element = &got.json()[0];
        assert_eq!(element["event"], posted["event"], "{stream}");
        assert_eq!(element.get("payload"), posted.get("payload"), "{stream}");
    }
    let resp = server
        .req("POST", "/publish")
        .json(&json!({"category": "bigpub", "data": big}))
        .send();
    assert_eq!(resp.status, 200, "{}", resp.text());
}

/// Whatever odd JSON the server accepts (deep nesting, lone surrogates), the in-process
/// subscriber can read back: an event no consumer can decode blocks the stream for it
/// forever, since it never learns the id to resume after.
#[test]
fn every_accepted_publish_can_be_read_back_in_process() {
    let server = start();
    let mut data: Vec<(String, String)> = [10, 100, 120, 127, 128, 129, 200, 1000, 10_000]
        .into_iter()
        .map(|depth| (format!("nested {depth} deep"), nested(depth)))
        .collect();
    // golongpoll (Go) takes a lone surrogate escape and reads it as U+FFFD.
    data.push(("a lone surrogate escape".into(), r#""\ud800""#.into()));
    data.push((
        "a reversed surrogate pair".into(),
        r#""\udc00\ud800""#.into(),
    ));
    let mut failures = Vec::new();
    for (i, (what, data)) in data.iter().enumerate() {
        // Once through each API: a published datum and a streams-API payload.
        let category = format!("odd-{i}");
        let published = server
            .req("POST", "/publish")
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"category":"{category}","data":{data}}}"#))
            .send();
        let stream = format!("odd-element-{i}");
        let appended = server
            .req("POST", &format!("/api/v1/streams/{stream}/events"))
            .header("X-Producer-ID", "p")
            .body(format!(r#"{{"event":{{"name":"a"}},"payload":{data}}}"#))
            .send();
        for (api, resp, category) in [
            ("publish", published, category),
            ("streams API", appended, stream),
        ] {
            if resp.status != 200 {
                if resp.status != 400 {
                    failures.push(format!("{api}, {what}: {} {}", resp.status, resp.text()));
                }
                continue;
            }
            let start = eventserver::Start::Since {
                ms: 0,
                last_id: None,
            };
            let polled = server
                .handle()
                .subscribe(&category, start, Duration::from_secs(1));
            if !matches!(polled, Ok(eventserver::Polled::Events(ref e)) if e.len() == 1) {
                failures.push(format!(
                    "{api}, {what}: accepted (200) but an in-process subscriber gets {polled:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn event_ids_that_are_not_uuids() {
    let server = start();
    let id = append_ok(&server, "s", "p", &event("a"));
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    let mut cases = Vec::new();
    for bad in [
        "not-a-uuid",
        "",
        "0",
        &id[..35],
        &format!("{id}0"),
        &id.replace('-', "")[..31],
        &format!("{}0", id.replace('-', "")),
        &"g".repeat(32),
        &id.replacen('-', "+", 1),
        &format!("{id}%00"),
        "00000000-0000-0000-0000-00000000000G",
        &"9".repeat(10_000),
    ] {
        cases.push(case(
            format!("event id {:?}", &bad[..bad.len().min(48)]),
            &ack("s", bad).body("action=ACK"),
            BAD_REQUEST,
        ));
        let short = &bad[..bad.len().min(48)];
        cases.push(case(
            format!("last_id {short:?}"),
            &subscribe(&format!("category=s&timeout=1&since_time=1&last_id={bad}")),
            if bad.is_empty() {
                Expect::Events
            } else {
                Expect::Error(200, "Param 'last_id' was not a valid UUID.")
            },
        ));
    }
    // Every form of a UUID is one: unknown ids are 404 and the known one is acknowledged.
    let unknown = uuid::Uuid::new_v4();
    for form in [
        unknown.braced().to_string(),
        unknown.urn().to_string(),
        unknown.simple().to_string(),
        unknown.hyphenated().to_string().to_uppercase(),
    ] {
        cases.push(case(
            format!("unknown event id in the form {form}"),
            &ack("s", &form).body("action=ACK"),
            Expect::Text(404, "Not Found"),
        ));
    }
    cases.push(case(
        "the known id in simple uppercase form",
        &ack("s", &uuid.simple().to_string().to_uppercase()).body("action=ACK"),
        Expect::Text(200, "OK"),
    ));
    run_table(&server, cases);
}

#[test]
fn basic_auth_headers_that_are_not_credentials() {
    let server = start();
    append_ok(&server, "s", "p", &event("a"));
    let headers: Vec<(&str, Vec<u8>)> = vec![
        ("not base64", b"Basic !!!not-base64!!!".to_vec()),
        (
            "base64 of bytes that are not UTF-8",
            format!("Basic {}", b64(b"tester:\xff\xfe")).into_bytes(),
        ),
        (
            "no colon",
            format!("Basic {}", b64(b"testercorrect horse")).into_bytes(),
        ),
        (
            "an empty user",
            format!("Basic {}", b64(b":correct horse")).into_bytes(),
        ),
        ("nothing after the scheme", b"Basic".to_vec()),
        ("only spaces after the scheme", b"Basic    ".to_vec()),
        (
            "base64 without padding",
            format!(
                "Basic {}",
                b64(b"tester:correct horse").trim_end_matches('=')
            )
            .into_bytes(),
        ),
        (
            "URL-safe base64 of a wrong password",
            format!(
                "Basic {}",
                base64::engine::general_purpose::URL_SAFE.encode(b"tester:?>?>")
            )
            .into_bytes(),
        ),
        (
            "another scheme",
            format!("Bearer {}", b64(b"tester:correct horse")).into_bytes(),
        ),
        (
            "the password with a NUL appended",
            format!("Basic {}", b64(b"tester:correct horse\0")).into_bytes(),
        ),
        (
            "a 64 KiB credential",
            format!("Basic {}", b64(&[b'a'; 48 * 1024])).into_bytes(),
        ),
        ("an empty value", Vec::new()),
    ];
    let mut cases = Vec::new();
    for (what, value) in &headers {
        cases.push(case(
            format!("streams API, Authorization with {what}"),
            &Req::raw("GET", "/api/v1/streams/s/events?eventName=a&limit=1")
                .header("X-Consumer-ID", "c")
                .header("Authorization", value),
            UNAUTHORIZED,
        ));
        cases.push(case(
            format!("long-poll, Authorization with {what}"),
            &Req::raw("GET", "/events?category=s&timeout=1").header("Authorization", value),
            Expect::Error(401, "Unauthorized"),
        ));
        cases.push(case(
            format!("publish, Authorization with {what}"),
            &Req::raw("POST", "/publish")
                .header("Authorization", value)
                .body(r#"{"category":"badpub","data":1}"#),
            Expect::Error(401, "Unauthorized"),
        ));
    }
    cases.push(case(
        "a raw non-UTF-8 Authorization value",
        &Req::raw("GET", "/api/v1/streams/s/events?eventName=a&limit=1")
            .header("X-Consumer-ID", "c")
            .header("Authorization", b"Basic \xff\xfe"),
        Expect::Closed,
    ));
    // Control: the same request with good credentials is served.
    cases.push(case(
        "good credentials",
        &consume("eventName=a&limit=1"),
        Expect::Status(200),
    ));
    run_write_table(&server, cases);
}

/// A sanity check of the harness itself: a row that expects the wrong thing fails.
#[test]
fn the_table_notices_a_wrong_expectation() {
    let server = start();
    let outcome = outcome(server.addr, Req::raw("GET", "/healthz").bytes(), false);
    assert!(check(&Expect::Status(200), &outcome).is_ok());
    assert!(check(&Expect::Status(404), &outcome).is_err());
    assert!(check(&Expect::Closed, &outcome).is_err());
    wait_until(Duration::from_secs(2), "the server serves", || {
        serving(server.addr).is_ok()
    });
}
