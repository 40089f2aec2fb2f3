//! Routes and handlers for both APIs, independent of the HTTP engine.
//!
//! A handler turns an [`Request`] into a typed call, runs it against the store and the
//! long-poll registry, and answers through its [`Reply`] — at once, after the writer commits,
//! or later from the registry. Each API renders errors in its own contract: the streams API
//! as JSON strings with the seed's status codes ([`streams`]), the long-poll API as
//! golongpoll's `{"error": …}` bodies ([`longpoll`]).

pub mod check;
pub mod longpoll;
mod query;
pub mod streams;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

use crate::auth::{Authenticator, Checked, Grants, Stored};
use crate::config::Config;
use crate::event::Event;
use crate::longpoll::{Registry, Woken};
use crate::store::Reader;
use crate::store::writer::{Job, WriteError};

/// The HTTP method, as far as the APIs care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// HEAD
    Head,
    /// Anything else.
    Other(String),
}

/// The body as received: its bytes, or the size a client declared beyond the limit.
#[derive(Debug)]
pub enum Body {
    /// The whole body.
    Bytes(Vec<u8>),
    /// Not read: it declared (or reached) more than the limit.
    TooLarge,
    /// Broken: shorter than declared, badly chunked, cut off, or framed two ways at once.
    Unreadable,
}

/// A request, decoded by the HTTP layer.
#[derive(Debug)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path, still percent-encoded, without the query.
    pub path: String,
    /// The raw query string (after `?`), possibly empty.
    pub query: String,
    /// The headers the APIs read (`Authorization`, `X-Producer-ID`, `X-Consumer-ID`), in
    /// arrival order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
    /// The client's address (the proxy's, behind a reverse proxy).
    pub remote: Option<std::net::SocketAddr>,
    /// Set when the HTTP layer refuses the request (503, for this reason) before any
    /// handler runs; the answer is rendered in its API's error contract.
    pub refused: Option<&'static str>,
}

impl Request {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response, rendered by the HTTP layer.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers besides `Content-Length`, which the HTTP layer adds.
    pub headers: Vec<(&'static str, String)>,
    /// The body, shared so one rendering can answer many waiters.
    pub body: Arc<[u8]>,
}

/// Answers a request exactly once. Dropping it unanswered answers 500.
pub type Reply = Box<dyn FnOnce(Response) + Send>;

/// Content type of every streams-API answer.
pub const JSON_UTF8: &str = "application/json; charset=utf-8";

/// The health check's paths. They are served ahead of reads and beyond the connection cap:
/// systemd's watchdog restarts a server whose check fails, and a busy server is not a dead
/// one.
pub const HEALTH_PATHS: &[&str] = &["/healthz", "/api/v1/health"];

impl Response {
    /// A response with a JSON body.
    pub fn json(status: u16, content_type: &'static str, body: impl Into<Arc<[u8]>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", content_type.to_owned())],
            body: body.into(),
        }
    }

    /// A streams-API answer: a JSON string body.
    pub fn message(status: u16, text: &str) -> Response {
        let body = serde_json::to_vec(text).expect("a str always serializes");
        Response::json(status, JSON_UTF8, body)
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

/// A parked reply: the request's answer channel and how to render its events.
pub struct Parked {
    reply: Reply,
    kind: ParkedKind,
    /// The client's address, to release the reply early when the client hangs up.
    peer: Option<SocketAddr>,
}

enum ParkedKind {
    /// A golongpoll subscriber of a category.
    LongPoll(Arc<str>),
    /// A streams-API consumer waiting with `timeout`.
    Consumer,
}

/// Everything handlers share: settings, the writer queue, the registry, credentials.
pub struct App {
    pub(crate) config: Config,
    pub(crate) writer: Sender<Job>,
    pub(crate) registry: Registry<Parked>,
    pub(crate) auth: Authenticator,
    pub(crate) clock: Arc<crate::clock::Clock>,
    pub(crate) tasks: Sender<crate::pool::Task>,
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    pub(crate) timer: Sender<()>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// Waiters answered per task, so a large fan-out spreads over the workers.
const ANSWER_CHUNK: usize = 256;

impl App {
    /// An answer refusing a request to `path` before its handler ran, in the shape of the
    /// API it was for: golongpoll's `{"error": …}` on the long-poll paths, a JSON string
    /// elsewhere.
    pub(crate) fn refusal(&self, path: &str, status: u16, why: &str) -> Response {
        if path == self.config.events_path || path == self.config.publish_path {
            longpoll::error_response(status, why)
        } else {
            Response::message(status, why)
        }
    }

    /// Serves one request on a worker.
    pub fn handle(&self, reader: &mut Reader, req: Request, reply: Reply) {
        let route = self.route(&req);
        let reply = self.instrument(route, &req, reply);
        match route {
            "health" => self.health(reader, reply),
            "metrics" => self.metrics(reader, &req, reply),
            "streams" => streams::handle(self, reader, req, reply),
            "subscribe" => longpoll::subscribe(self, reader, req, reply),
            "publish" => longpoll::publish(self, reader, req, reply),
            "panic" => panic!("panic injected through the test route"),
            _ => reply(Response::message(404, "Not Found")),
        }
    }

    /// The route a request belongs to, also its metrics label.
    fn route(&self, req: &Request) -> &'static str {
        let path = req.path.as_str();
        if HEALTH_PATHS.contains(&path) {
            "health"
        } else if path == "/metrics" {
            "metrics"
        } else if path.starts_with("/api/v1/") {
            "streams"
        } else if path == self.config.events_path {
            "subscribe"
        } else if path == self.config.publish_path {
            "publish"
        } else if self.config.panic_route && path == "/.eventserver-panic" {
            "panic"
        } else {
            "other"
        }
    }

    /// Wraps `reply` to count the answer and log one line for it.
    fn instrument(&self, route: &'static str, req: &Request, reply: Reply) -> Reply {
        let started = Instant::now();
        // The log line is prepared only when it will be written. Only the claimed user name
        // is logged, never the password or the header.
        let line = crate::log::enabled(crate::log::Level::Info).then(|| {
            let user = req
                .header("Authorization")
                .and_then(crate::auth::parse_basic)
                .map_or_else(|| "-".to_owned(), |c| c.user);
            (format!("{} {}", method_name(&req.method), req.path), user)
        });
        let metrics = self.metrics.clone();
        Box::new(move |response: Response| {
            let status = response.status;
            reply(response);
            let took = started.elapsed();
            metrics.request(route, status, took);
            if let Some((request, user)) = line {
                let ms = took.as_secs_f64() * 1000.0;
                crate::log::info(&format!("{request} {status} {ms:.1}ms user={user}"));
            }
        })
    }

    /// 200 when the database answers a read and commits a write, 503 otherwise. Needs no
    /// credentials; answers after the writer's heartbeat commits, without holding a worker.
    fn health(&self, reader: &mut Reader, reply: Reply) {
        let unavailable = || Response::json(503, JSON_UTF8, &b"{\"status\":\"unavailable\"}"[..]);
        if let Err(e) = reader.user("") {
            crate::log::error(&format!("health: the database does not answer: {e}"));
            return reply(unavailable());
        }
        let job = Job::Probe(Box::new(move |result| {
            reply(match result {
                Ok(()) => Response::json(200, JSON_UTF8, &b"{\"status\":\"ok\"}"[..]),
                Err(_) => unavailable(),
            })
        }));
        if let Err(job) = self.submit(job) {
            refuse_busy(job);
        }
    }

    /// The Prometheus scrape.
    fn metrics(&self, reader: &mut Reader, req: &Request, reply: Reply) {
        if self.config.metrics_auth
            && let Err(failure) = self.authenticate(reader, req)
        {
            return reply(failure.answer(Response::message));
        }
        let lag = reader.consumer_lag().unwrap_or_else(|e| {
            crate::log::error(&format!("metrics: reading consumer lag failed: {e}"));
            Vec::new()
        });
        let database_bytes = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                let mut path = self.config.db.clone().into_os_string();
                path.push(suffix);
                std::fs::metadata(path).ok().map(|m| m.len())
            })
            .sum();
        let gauges = crate::metrics::Gauges {
            parked: self.registry.parked(),
            database_bytes,
            lag,
        };
        let body = self.metrics.render(&gauges);
        reply(Response::json(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            body.into_bytes(),
        ))
    }

    /// Checks Basic credentials; `Err` carries the answer to send instead (401 or 500).
    pub(crate) fn authenticate(
        &self,
        reader: &Reader,
        req: &Request,
    ) -> Result<Arc<Grants>, AuthFailure> {
        let creds = req
            .header("Authorization")
            .and_then(crate::auth::parse_basic)
            .ok_or(AuthFailure::Unauthorized)?;
        let client = req.remote.map(|a| a.ip());
        let lookup = |user: &str| {
            reader.user(user).map(|found| {
                found.map(|u| Stored {
                    grants: Grants::new(&u.produce, &u.consume),
                    hash: u.hash,
                })
            })
        };
        match self.auth.check(&creds, client, lookup) {
            Ok(Checked::Valid(grants)) => Ok(grants),
            Ok(Checked::Invalid) => Err(AuthFailure::Unauthorized),
            Ok(Checked::Throttled(wait)) => Err(AuthFailure::Throttled(wait)),
            Err(e) => {
                crate::log::error(&format!("reading credentials failed: {e}"));
                Err(AuthFailure::Storage)
            }
        }
    }

    /// Queues a writer job; `false` if the queue is full or the writer is gone.
    pub(crate) fn submit(&self, job: Job) -> Result<(), Job> {
        self.writer.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
        })
    }

    /// Parks `parked` or answers it, for a long-poll on `category`.
    pub(crate) fn wait(&self, reader: &mut Reader, category: &str, want: Want, parked: Parked) {
        use crate::longpoll::{Poll, Wait};
        let Want {
            start,
            filter,
            limit,
            timeout,
        } = want;
        let start = &start;
        let filter = filter.as_deref();
        let deadline = Instant::now() + timeout;
        let wait = |reply| Wait {
            reply,
            filter: filter.map(Into::into),
            limit,
            deadline,
        };
        let mut poll = self.registry.poll(category, start, wait(parked));
        // The store decides what memory cannot. New commits can race the read; each retry
        // means another commit landed, and memory answers once it holds them.
        for _ in 0..8 {
            let Poll::Unknown(parked) = poll else { break };
            poll = match reader.since(category, start, filter, limit) {
                Ok(view) if !view.events.is_empty() => {
                    let events = view.events.into_iter().map(Arc::new).collect();
                    Poll::Ready(parked, events)
                }
                Ok(view) => self.registry.park_after(category, view.hwm, wait(parked)),
                Err(e) => {
                    crate::log::error(&format!("long-poll read failed: {e}"));
                    return parked.fail(500, "could not read the stream");
                }
            };
        }
        match poll {
            Poll::Ready(parked, events) => {
                let response = render_events(&parked.kind, &events);
                (parked.reply)(response);
            }
            Poll::Parked { earliest } => {
                if earliest {
                    let _ = self.timer.try_send(());
                }
            }
            Poll::Full(parked) => parked.fail(503, "too many parked long-polls"),
            Poll::Closed(parked) => self.expire(|_| vec![parked]),
            Poll::Unknown(parked) => parked.fail(503, "the stream is changing too fast"),
        }
    }

    /// Releases the parked replies of clients that hung up (`peers`), answering them as if
    /// their deadline had passed: they no longer hold a place under the parked-poll cap.
    pub(crate) fn release_gone(&self, peers: &HashSet<SocketAddr>) {
        self.expire(|registry| {
            let gone =
                registry.take_where(|parked| parked.peer.is_some_and(|peer| peers.contains(&peer)));
            if !gone.is_empty() {
                let n = gone.len();
                crate::log::debug(&format!("released {n} polls of clients that hung up"));
            }
            gone
        });
    }

    /// Answers woken waiters, spread over workers.
    pub(crate) fn answer(&self, woken: Vec<Woken<Parked>>) {
        for group in woken {
            let mut replies = group.replies.into_iter().peekable();
            let Some(first) = replies.peek() else {
                continue;
            };
            let body = render_events(&first.kind, &group.events);
            let mut chunk = Vec::with_capacity(ANSWER_CHUNK);
            for parked in replies {
                chunk.push(parked);
                if chunk.len() == ANSWER_CHUNK {
                    self.spawn_answers(std::mem::take(&mut chunk), body.clone());
                }
            }
            if !chunk.is_empty() {
                self.spawn_answers(chunk, body);
            }
        }
    }

    fn spawn_answers(&self, chunk: Vec<Parked>, body: Response) {
        self.spawn(Box::new(move || {
            for parked in chunk {
                (parked.reply)(body.clone());
            }
        }));
    }

    /// Runs `task` on a worker.
    pub(crate) fn spawn(&self, task: Box<dyn FnOnce() + Send>) {
        if let Err(e) = self.tasks.send(Some(task)) {
            // Workers are gone; answer here rather than drop the replies.
            if let Some(task) = e.into_inner() {
                task();
            }
        }
    }

    /// Answers the parked replies `take` removes from the registry (deadline passed,
    /// shutdown, client gone): the timeout body for subscribers, `[]` for streams-API
    /// consumers. The timeout's stamp is taken first: a batch committed while the replies
    /// are being removed then gets a later timestamp, so a client resuming from the stamp
    /// still receives it.
    pub(crate) fn expire(&self, take: impl FnOnce(&Registry<Parked>) -> Vec<Parked>) {
        let stamp = self.clock.answer_stamp();
        let replies = take(&self.registry);
        if replies.is_empty() {
            return;
        }
        let timeout = longpoll::timeout_response(stamp);
        let empty = Response::json(200, JSON_UTF8, &b"[]"[..]);
        let mut replies = replies.into_iter().peekable();
        while replies.peek().is_some() {
            let chunk: Vec<Parked> = replies.by_ref().take(ANSWER_CHUNK).collect();
            let (timeout, empty) = (timeout.clone(), empty.clone());
            self.spawn(Box::new(move || {
                for parked in chunk {
                    let body = match parked.kind {
                        ParkedKind::LongPoll(_) => timeout.clone(),
                        ParkedKind::Consumer => empty.clone(),
                    };
                    (parked.reply)(body);
                }
            }));
        }
    }
}

fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Post => "POST",
        Method::Head => "HEAD",
        Method::Other(m) => m,
    }
}

/// Renders events for a parked reply's kind; all replies of one group share the kind.
fn render_events(kind: &ParkedKind, events: &[Arc<Event>]) -> Response {
    match kind {
        ParkedKind::LongPoll(category) => longpoll::events_response(category, events),
        ParkedKind::Consumer => streams::elements_response(events.iter().map(|e| &*e.data)),
    }
}

impl Parked {
    fn fail(self, status: u16, why: &str) {
        let response = match self.kind {
            ParkedKind::LongPoll(_) => longpoll::error_response(status, why),
            ParkedKind::Consumer => streams::failure(status, why),
        };
        (self.reply)(response);
    }
}

/// What a long-poll waits for.
pub(crate) struct Want {
    /// Where to start reading.
    pub start: crate::event::Start,
    /// Only events with this name (streams-API consumers).
    pub filter: Option<String>,
    /// Most events in the answer.
    pub limit: usize,
    /// How long to wait.
    pub timeout: Duration,
}

/// Why authentication did not pass.
pub(crate) enum AuthFailure {
    /// Missing or wrong credentials.
    Unauthorized,
    /// Too many failures from this client lately; retry after this long.
    Throttled(Duration),
    /// The user table could not be read.
    Storage,
}

impl AuthFailure {
    /// The status and reason to answer with; 401 and 429 carry their headers.
    pub(crate) fn answer(&self, render: impl FnOnce(u16, &str) -> Response) -> Response {
        match self {
            AuthFailure::Unauthorized => render(401, "Unauthorized")
                .with_header("WWW-Authenticate", "Basic realm=\"eventserver\""),
            AuthFailure::Throttled(wait) => {
                let secs = wait.as_secs().max(1);
                let why = format!("Too Many Requests - too many failed logins, retry in {secs} s");
                render(429, &why).with_header("Retry-After", secs.to_string())
            }
            AuthFailure::Storage => {
                render(500, "Internal Server Error - could not check credentials")
            }
        }
    }
}

/// Maps a writer refusal to the log line and short reason clients see.
pub(crate) fn storage_reason(e: &WriteError) -> &'static str {
    match e {
        WriteError::Storage(detail) => {
            crate::log::error(&format!("write failed: {detail}"));
            "could not store the event"
        }
        WriteError::Busy => "the write queue is full",
        WriteError::Locked | WriteError::NotFound => "unexpected write outcome",
    }
}

/// Answers a job the writer could not take (its queue is full, or it has stopped).
pub(crate) fn refuse_busy(job: Job) {
    match job {
        Job::Append { done, .. } => done(Err(WriteError::Busy)),
        Job::Ack { done, .. } | Job::Probe(done) => done(Err(WriteError::Busy)),
        Job::Stop | Job::Retain { .. } => {}
    }
}
