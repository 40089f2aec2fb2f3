//! Server-Sent Events on the long-poll view: `GET /events` with
//! `Accept: text/event-stream`, read over raw sockets as a browser's `EventSource` reads
//! it. Every wait has a deadline.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

/// One thing a stream sends.
#[derive(Debug, PartialEq)]
enum Item {
    /// A message: its `id:` and its `data:` lines joined.
    Event { id: String, data: Value },
    /// A comment line (a heartbeat).
    Comment,
    /// A `retry:` field.
    Retry(u64),
    /// The server closed the stream.
    End,
}

/// A stream of events as a client reads it.
struct Stream {
    reader: BufReader<TcpStream>,
    /// The head's headers.
    headers: Vec<(String, String)>,
}

impl Stream {
    /// Sends `req` (with `Accept: text/event-stream` added) and reads a 200 head.
    #[track_caller]
    fn open(addr: SocketAddr, req: Req) -> Stream {
        let tcp = TcpStream::connect(addr).expect("connect");
        Stream::open_on(tcp, req)
    }

    /// [`Stream::open`] on a connection the test made.
    #[track_caller]
    fn open_on(mut tcp: TcpStream, req: Req) -> Stream {
        let req = req.header("Accept", "text/event-stream");
        tcp.write_all(&req.bytes()).expect("send");
        Stream::head(tcp)
    }

    /// Reads a 200 head on a connection where a stream was asked for.
    #[track_caller]
    fn head(tcp: TcpStream) -> Stream {
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(tcp);
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        assert!(line.starts_with("HTTP/1.1 200 "), "status line: {line:?}");
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("head");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').expect("a header line");
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
        Stream { reader, headers }
    }

    /// The first header called `name`.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The next item, within `within`, or the test fails.
    #[track_caller]
    fn next(&mut self, within: Duration) -> Item {
        let deadline = Instant::now() + within;
        let (mut id, mut data, mut comment, mut retry) = (None, Vec::<String>::new(), false, None);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "nothing from the stream within {within:?}");
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Item::End,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("nothing from the stream within {within:?}")
                }
                Err(_) => return Item::End,
            }
            assert!(line.ends_with('\n'), "a line cut short: {line:?}");
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if let Some(id) = id.take() {
                    let data = serde_json::from_str(&data.join("\n")).expect("data is JSON");
                    return Item::Event { id, data };
                }
                if let Some(ms) = retry.take() {
                    return Item::Retry(ms);
                }
                if comment {
                    return Item::Comment;
                }
                continue;
            }
            if line.starts_with(':') {
                comment = true;
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v.to_owned());
            } else if let Some(v) = line.strip_prefix("retry: ") {
                retry = Some(v.parse().expect("retry in ms"));
            } else {
                panic!("unexpected line {line:?}");
            }
        }
    }

    /// The next message, skipping heartbeats and retry hints.
    #[track_caller]
    fn event(&mut self, within: Duration) -> (String, Value) {
        loop {
            match self.next(within) {
                Item::Event { id, data } => return (id, data),
                Item::End => panic!("the stream ended while an event was expected"),
                _ => {}
            }
        }
    }

    /// Asserts that the stream ends within `within`, with no further event.
    #[track_caller]
    fn expect_end(&mut self, within: Duration) {
        loop {
            match self.next(within) {
                Item::End => return,
                Item::Event { id, .. } => panic!("unexpected event {id}"),
                _ => {}
            }
        }
    }
}

/// A subscribe with `query`, as the test user.
fn stream_req(server: &TestServer, query: &str) -> Req {
    subscribe_req(server, query)
}

/// Publishes `data` to `category` and returns the event object a subscriber gets.
fn published(server: &TestServer, category: &str, data: Value) -> Value {
    publish_ok(server, category, &data);
    let resp = subscribe_req(
        server,
        &format!("timeout=1&category={category}&since_time=0"),
    )
    .send();
    let events = resp.json()["events"].as_array().cloned().expect("events");
    events.last().cloned().expect("the event just published")
}

/// Asserts that `got` is the message of event object `want`.
#[track_caller]
fn expect_event(got: (String, Value), want: &Value) {
    assert_eq!(&got.1, want, "data is the long-poll event object");
    assert_eq!(got.0, want["id"].as_str().unwrap(), "id: is the event id");
}

const PROMPT: Duration = Duration::from_secs(5);

#[test]
fn a_stream_delivers_events_from_before_and_after_it_opened_in_order_once() {
    let server = TestServer::start();
    let first = published(&server, "s", json!({"n": 1}));
    let second = published(&server, "s", json!({"n": 2}));
    let mut stream = Stream::open(server.addr, stream_req(&server, "category=s&since_time=0"));
    assert_eq!(stream.header("Content-Type"), Some("text/event-stream"));
    assert_eq!(stream.header("Cache-Control"), Some("no-cache"));
    assert_eq!(
        stream.next(PROMPT),
        Item::Retry(1000),
        "the retry hint comes first"
    );
    expect_event(stream.event(PROMPT), &first);
    expect_event(stream.event(PROMPT), &second);
    // After it opened; posted JSON spanning lines arrives as several `data:` lines.
    server
        .req("POST", "/publish")
        .body("{\"category\": \"s\",\n \"data\": {\n  \"n\": 3\n }\n}")
        .send();
    let (id, third) = stream.event(PROMPT);
    assert_eq!(third["data"], json!({"n": 3}));
    assert_eq!(third["id"], id.as_str());
    let fourth = published(&server, "s", json!({"n": 4}));
    expect_event(stream.event(PROMPT), &fourth);

    // Resuming after the second event by Last-Event-ID (what EventSource sends), and by
    // since_time/last_id, starts right after it: the third, the fourth, the fifth, then
    // new ones, each once.
    let fifth = published(&server, "s", json!({"n": 5}));
    expect_event(stream.event(PROMPT), &fifth);
    let second_id = second["id"].as_str().unwrap();
    let by_header = stream_req(&server, "category=s").header("Last-Event-ID", second_id);
    let since = second["timestamp"].as_u64().unwrap();
    let by_query = stream_req(
        &server,
        &format!("category=s&since_time={since}&last_id={second_id}"),
    );
    let mut resumed: Vec<Stream> = [by_header, by_query]
        .into_iter()
        .map(|req| Stream::open(server.addr, req))
        .collect();
    for resumed in &mut resumed {
        assert_eq!(resumed.event(PROMPT).1, third);
        expect_event(resumed.event(PROMPT), &fourth);
        expect_event(resumed.event(PROMPT), &fifth);
    }
    let sixth = published(&server, "s", json!({"n": 6}));
    for stream in resumed.iter_mut().chain([&mut stream]) {
        expect_event(stream.event(PROMPT), &sixth);
    }
    // Without a start, a stream begins at the newest event as of its head: an event
    // published as soon as the head is read is the stream's first, every time.
    for n in 7..17 {
        let mut fresh = Stream::open(server.addr, stream_req(&server, "category=s"));
        let next = published(&server, "s", json!({ "n": n }));
        assert_eq!(fresh.next(PROMPT), Item::Retry(1000));
        expect_event(fresh.event(PROMPT), &next);
        expect_event(stream.event(PROMPT), &next);
    }
}

/// Publishers on every node at once (one node, or two on PostgreSQL, where the writer's
/// commits and the other node's, caught up, are registered on two threads): the stream
/// gets every event once, in the order the store gives them.
#[test]
fn a_stream_gets_concurrent_publishes_through_every_node_in_order() {
    let server = TestServer::start();
    let mut stream = Stream::open(server.addr, subscribe_req(server.addr, "category=race"));
    assert_eq!(stream.next(PROMPT), Item::Retry(1000));
    const EACH: u64 = 150;
    let publishers: Vec<_> = (0..2u64)
        .map(|t| {
            let node = server.addrs()[t as usize % server.addrs().len()];
            std::thread::spawn(move || {
                for n in 0..EACH {
                    publish_ok(node, "race", &json!({"t": t, "n": n}));
                }
            })
        })
        .collect();
    let streamed: Vec<String> = (0..2 * EACH).map(|_| stream.event(PROMPT).0).collect();
    publishers.into_iter().for_each(|p| p.join().unwrap());
    // Paged back as a long-poll client resumes: from each page's last event.
    let mut stored: Vec<Value> = Vec::new();
    while stored.len() < streamed.len() {
        let query = match stored.last() {
            None => "timeout=1&category=race&since_time=0".to_owned(),
            Some(e) => format!(
                "timeout=1&category=race&since_time={}&last_id={}",
                e["timestamp"],
                e["id"].as_str().unwrap()
            ),
        };
        let page = subscribe_req(server.addr, &query).send().json();
        let events = page["events"].as_array().cloned().unwrap_or_default();
        assert!(
            !events.is_empty(),
            "the store has fewer events than the stream"
        );
        stored.extend(events);
    }
    let stored: Vec<&str> = stored.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(streamed, stored, "the stream's order is the store's");
}

#[test]
fn heartbeats_arrive_and_the_lifetime_closes_the_stream() {
    let server = TestServer::start_with(|c| {
        c.sse_heartbeat = Duration::from_secs(1);
        c.sse_lifetime = Duration::from_secs(4);
    });
    let opened = Instant::now();
    let mut stream = Stream::open(server.addr, stream_req(&server, "category=beat"));
    assert_eq!(stream.next(PROMPT), Item::Retry(1000));
    let mut beats = 0;
    loop {
        match stream.next(PROMPT) {
            Item::Comment => beats += 1,
            Item::End => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let lived = opened.elapsed();
    assert!(beats >= 2, "{beats} heartbeats in {lived:?}");
    assert!(
        lived >= Duration::from_millis(3900) && lived < Duration::from_secs(7),
        "closed after {lived:?}"
    );
    wait_until(PROMPT, "the stream's place given back", || {
        server.handle().parked() == 0
    });
}

#[test]
fn a_stream_takes_a_parked_place() {
    let server = TestServer::start_with(|c| c.max_parked = 2);
    // The cap is a node's: everything that parks goes to the first node (`server.addr`).
    let node = server.addr;
    let mut stream = Stream::open(node, subscribe_req(node, "category=cap"));
    assert_eq!(stream.next(PROMPT), Item::Retry(1000));
    let poll = std::thread::spawn({
        let req = subscribe_req(node, "timeout=20&category=cap");
        move || req.send()
    });
    wait_until(PROMPT, "a stream and a poll parked", || {
        server.handle().parked() == 2
    });
    let refused = subscribe_req(node, "category=cap")
        .header("Accept", "text/event-stream")
        .send();
    assert_eq!(refused.status, 503, "{}", refused.text());
    let refused = subscribe_req(node, "timeout=20&category=cap").send();
    assert_eq!(refused.status, 503, "{}", refused.text());
    let event = published(&server, "cap", json!("both"));
    expect_event(stream.event(PROMPT), &event);
    assert_eq!(poll.join().unwrap().json()["events"][0], event);
}

#[test]
fn a_reader_that_stops_reading_is_cut_and_others_still_get_their_events() {
    let server = TestServer::start_with(|c| c.sse_heartbeat = Duration::from_secs(1));
    // The stalled client asks for a small receive window, so its buffers fill sooner.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stalled = Stream::open_on(socket.into(), stream_req(&server, "category=big"));
    let mut reading = Stream::open(server.addr, stream_req(&server, "category=big"));
    wait_until(PROMPT, "both streams parked", || {
        server.handle().parked() == 2
    });
    let chunk = "x".repeat(100 << 10);
    // The stalled stream gives back its place once cut. A heartbeat takes a stream out and
    // parks it again in a moment: the place must stay free across two publishes.
    let mut free_since = None;
    for n in 0.. {
        assert!(n < 300, "the stalled reader was never cut");
        let started = Instant::now();
        publish_ok(&server, "big", &json!({"n": n, "pad": chunk}));
        let (_, data) = reading.event(PROMPT);
        assert_eq!(data["data"]["n"], n);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "an event took {:?} to reach a reading client",
            started.elapsed()
        );
        match (server.handle().parked(), free_since) {
            (2, _) => free_since = None,
            (_, None) => free_since = Some(n),
            (_, Some(_)) => break,
        }
    }
    // The stalled client finds its stream ended once it reads what reached it.
    let mut rest = stalled.reader;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sink = vec![0; 1 << 16];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the stalled stream was not closed");
        rest.get_ref().set_read_timeout(Some(left)).unwrap();
        match rest.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the stalled stream was not closed")
            }
            Err(_) => break,
        }
    }
    let later = published(&server, "big", json!("after"));
    expect_event(reading.event(PROMPT), &later);
}

#[test]
fn streams_take_credentials_grants_and_public_categories_as_polls_do() {
    let server = TestServer::start_with(|c| c.public_subscribe = vec!["open*".into()]);
    eventserver::admin::add_user_with(&server.db, "reader", "pw", "", "mine*")
        .expect("add a limited user");
    let sse = |req: Req| req.header("Accept", "text/event-stream");
    let anonymous = sse(server.anon("GET", "/events?category=s")).send();
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let wrong = sse(Req::new(server.addr, "GET", "/events?category=s").auth(USER, "nope")).send();
    assert_eq!(wrong.status, 401);
    let limited = |category: &str| {
        Req::new(server.addr, "GET", format!("/events?category={category}")).auth("reader", "pw")
    };
    let forbidden = sse(limited("s")).send();
    assert_eq!(forbidden.status, 403, "{}", forbidden.text());
    assert_eq!(forbidden.text(), r#"{"error": "Forbidden"}"#);
    let mut granted = Stream::open(server.addr, limited("mine-1"));
    let mut public = Stream::open(server.addr, server.anon("GET", "/events?category=open-1"));
    let mine = published(&server, "mine-1", json!("mine"));
    expect_event(granted.event(PROMPT), &mine);
    let open = published(&server, "open-1", json!("open"));
    expect_event(public.event(PROMPT), &open);
}

#[test]
fn shutdown_closes_every_stream() {
    let mut server = TestServer::start();
    let mut streams: Vec<Stream> = (0..3)
        .map(|i| {
            Stream::open(
                server.addr,
                stream_req(&server, &format!("category=down{i}")),
            )
        })
        .collect();
    wait_until(PROMPT, "the streams parked", || {
        server.handle().parked() == 3
    });
    let handle = server.handle.take().expect("running");
    let stopper = std::thread::spawn(move || handle.shutdown());
    for stream in &mut streams {
        stream.expect_end(Duration::from_secs(3));
    }
    stopper.join().expect("shutdown");
}

#[test]
fn a_request_pipelined_behind_a_stream_leaves_the_workers_free() {
    let server = TestServer::start_with(|c| c.workers = 1);
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    let stream = stream_req(&server, "category=piped")
        .header("Accept", "text/event-stream")
        .keep_alive();
    let behind = subscribe_req(&server, "timeout=1&category=other").keep_alive();
    let mut both = stream.bytes();
    both.extend(behind.bytes());
    tcp.write_all(&both).unwrap();
    let mut piped = Stream::head(tcp);
    // The one worker is free: others are served, and the stream goes on.
    for _ in 0..3 {
        let resp = send_within(
            server.addr,
            &subscribe_req(&server, "timeout=1&category=x"),
            PROMPT,
        );
        assert_eq!(resp.status, 200);
    }
    let event = published(&server, "piped", json!("still streaming"));
    expect_event(piped.event(PROMPT), &event);
}
