//! `--engine-floor`: what the HTTP engine alone allows, to hold eventserver's figures against.
//!
//! A bare long-poll server in golongpoll's wire format on tiny_http 0.12 — the engine the
//! design fixes for eventserver — doing none of eventserver's work: no authentication, no
//! disk, no limits, no ordering per connection, everything in memory, each request served
//! on the thread that takes it from tiny_http (no queue to a worker pool), every parked poll
//! answered by 4 threads in chunks of 256 (as eventserver does). It serves `/events`
//! (`category`, `since_time`, `last_id`; polls never time out) and `/publish` (in memory:
//! nothing durable), enough for the fanout and categories scenarios and for the ceiling of
//! `publish --api publish`; everything else is 404. A budget this server misses on this machine is out
//! of reach for any server built on tiny_http here.
//!
//! The bench runs it as a child process of its own (`load --floor-server ADDR`), so its
//! descriptors and CPU are apart from the bench's, as the spawned eventserver's are.

use std::io::Cursor;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use crossbeam_channel::Sender;
use serde_json::value::RawValue;

/// Threads taking requests from tiny_http, and threads answering parked polls.
const THREADS: usize = 4;
/// Parked polls one answering task writes.
const CHUNK: usize = 256;

struct Event {
    ts: u64,
    id: String,
    category: String,
    data: String,
}

/// Parked polls to answer with one body.
type Chunk = (Vec<tiny_http::Request>, Arc<[u8]>);

#[derive(Default)]
struct Log {
    events: Vec<Event>,
    parked: Vec<(tiny_http::Request, String)>,
    clock: u64,
}

/// Serves on `addr` until the process is killed.
pub fn serve(addr: &str) -> Result<(), String> {
    let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| e.to_string())?);
    let log = Arc::new(Mutex::new(Log::default()));
    let (answers, chunks) = crossbeam_channel::unbounded::<Chunk>();
    let mut threads = Vec::new();
    for _ in 0..THREADS {
        let chunks = chunks.clone();
        threads.push(thread::spawn(move || {
            for (requests, body) in chunks {
                requests.into_iter().for_each(|rq| answer(rq, body.clone()));
            }
        }));
        let (server, log, answers) = (server.clone(), log.clone(), answers.clone());
        threads.push(thread::spawn(move || {
            while let Ok(rq) = server.recv() {
                handle(rq, &log, &answers);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn handle(mut rq: tiny_http::Request, log: &Mutex<Log>, answers: &Sender<Chunk>) {
    let url = rq.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    if path == "/publish" {
        let mut body = String::new();
        let parsed = rq
            .as_reader()
            .read_to_string(&mut body)
            .ok()
            .and_then(|_| serde_json::from_str::<Publish>(&body).ok());
        let Some(publish) = parsed else {
            return answer(rq, Arc::from(&b"{\"error\": \"bad publish\"}"[..]));
        };
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        log.clock = log.clock.max(now_ms());
        let event = Event {
            ts: log.clock,
            id: uuid::Uuid::new_v4().to_string(),
            category: publish.category,
            data: publish.data.get().to_owned(),
        };
        let body: Arc<[u8]> = render(&[&event]).into();
        let (woken, kept) = std::mem::take(&mut log.parked)
            .into_iter()
            .partition::<Vec<_>, _>(|(_, c)| *c == event.category);
        log.parked = kept;
        log.events.push(event);
        drop(log);
        answer(rq, Arc::from(&b"{\"success\": true}"[..]));
        let mut woken: Vec<_> = woken.into_iter().map(|(rq, _)| rq).collect();
        while !woken.is_empty() {
            let chunk = woken.split_off(woken.len().saturating_sub(CHUNK));
            let _ = answers.send((chunk, body.clone()));
        }
        return;
    }
    if path != "/events" {
        let _ = rq.respond(tiny_http::Response::empty(404));
        return;
    }
    let (mut category, mut since, mut last_id) = (String::new(), 0, None);
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match k {
            "category" => category = v.to_owned(),
            "since_time" => since = v.parse().unwrap_or(0),
            "last_id" => last_id = Some(v.to_owned()),
            _ => {}
        }
    }
    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
    let after_id = last_id.and_then(|id| log.events.iter().rposition(|e| e.id == id));
    let start = after_id.map_or_else(|| log.events.partition_point(|e| e.ts < since), |i| i + 1);
    let found: Vec<&Event> = log.events[start..]
        .iter()
        .filter(|e| e.category == category)
        .collect();
    if found.is_empty() {
        log.parked.push((rq, category));
    } else {
        let body = render(&found);
        drop(log);
        answer(rq, body.into());
    }
}

#[derive(serde::Deserialize)]
struct Publish {
    category: String,
    data: Box<RawValue>,
}

fn render(events: &[&Event]) -> Vec<u8> {
    let items: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                r#"{{"timestamp":{},"category":{},"data":{},"id":"{}"}}"#,
                e.ts,
                serde_json::Value::from(e.category.as_str()),
                e.data,
                e.id
            )
        })
        .collect();
    format!(r#"{{"events":[{}]}}"#, items.join(",")).into_bytes()
}

fn answer(rq: tiny_http::Request, body: Arc<[u8]>) {
    let len = body.len();
    let json =
        tiny_http::Header::from_bytes("Content-Type", "application/json").expect("an ASCII header");
    let _ = rq.respond(tiny_http::Response::new(
        tiny_http::StatusCode(200),
        vec![json],
        Cursor::new(body),
        Some(len),
        None,
    ));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
