//! Routes and handlers for both APIs, independent of the HTTP engine.
//!
//! A handler turns an [`Request`] into a typed call, runs it against the store and the
//! long-poll registry, and answers through its [`Reply`] — at once, after the writer commits,
//! or later from the registry. Every failure is a [`Failure`] from one catalogue
//! ([`error`]), which each API renders in its own contract: the streams API as JSON strings
//! (`"Bad Request - <why>"`), the long-poll API as golongpoll's `{"error": …}` bodies.

pub mod check;
pub mod error;
pub mod longpoll;
mod query;
pub mod streams;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

pub use error::{Api, Failure};

use crate::auth::{Authenticator, Checked, Grants, Stored};
use crate::config::Config;
use crate::event::Event;
use crate::longpoll::{Registry, Woken};
use crate::store::Reader;
use crate::store::writer::{Job, WriteError};
use longpoll::Polled;

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
    /// Set when the HTTP layer refuses the request before any handler runs; the answer is
    /// rendered in its API's error contract.
    pub refused: Option<Failure>,
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

/// A parked long-poll: who waits, and the client's address.
pub struct Parked {
    waiter: Waiter,
    /// The client's address, to release the reply early when the client hangs up.
    peer: Option<SocketAddr>,
}

/// Who waits for events, which decides the shape of the answer.
enum Waiter {
    /// A golongpoll subscriber of a category, over HTTP.
    LongPoll(Arc<str>, Reply),
    /// A streams-API consumer waiting with `timeout`, over HTTP.
    Consumer(Reply),
    /// An in-process subscriber of a category ([`crate::ServerHandle::subscribe`]).
    InProcess(Arc<str>, Sender<Result<Polled, Failure>>),
}

/// One answer for many parked requests, rendered once in each shape a waiter needs.
#[derive(Clone, Default)]
struct Answers {
    longpoll: Option<Response>,
    consumer: Option<Response>,
    in_process: Option<Result<Polled, Failure>>,
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
    /// The API a request to `path` is for: long-poll on its two paths, streams elsewhere.
    fn api_of(&self, path: &str) -> Api {
        if path == self.config.events_path || path == self.config.publish_path {
            Api::LongPoll
        } else {
            Api::Streams
        }
    }

    /// An answer refusing a request to `path` before its handler ran, in the shape of the
    /// API it was for.
    pub(crate) fn refusal(&self, path: &str, failure: &Failure) -> Response {
        failure.render(self.api_of(path))
    }

    /// Whether shutdown has begun.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
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
            #[cfg(feature = "test-panic-route")]
            "panic" => panic!("panic injected through the test route"),
            _ => reply(Failure::NotFound.render(Api::Streams)),
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
        } else if cfg!(feature = "test-panic-route") && path == "/.eventserver-panic" {
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
        self.submit(Job::Probe(Box::new(move |result| {
            reply(match result {
                Ok(()) => Response::json(200, JSON_UTF8, &b"{\"status\":\"ok\"}"[..]),
                Err(_) => unavailable(),
            })
        })));
    }

    /// The Prometheus scrape.
    fn metrics(&self, reader: &mut Reader, req: &Request, reply: Reply) {
        if self.config.metrics_auth
            && let Err(failure) = self.authenticate(reader, req)
        {
            return reply(failure.render(Api::Streams));
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

    /// Checks Basic credentials: the user's grants, or 401, 429 or 500.
    pub(crate) fn authenticate(
        &self,
        reader: &Reader,
        req: &Request,
    ) -> Result<Arc<Grants>, Failure> {
        let creds = req
            .header("Authorization")
            .and_then(crate::auth::parse_basic)
            .ok_or(Failure::Unauthorized)?;
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
            Ok(Checked::Invalid) => Err(Failure::Unauthorized),
            Ok(Checked::Throttled(wait)) => Err(Failure::Throttled(wait)),
            Err(e) => {
                crate::log::error(&format!("reading credentials failed: {e}"));
                Err(Failure::CredentialsUnreadable)
            }
        }
    }

    /// Queues a writer job. One the writer cannot take (its queue is full, or it has
    /// stopped) is answered at once with [`WriteError::Busy`].
    pub(crate) fn submit(&self, job: Job) {
        let job = match self.writer.try_send(job) {
            Ok(()) => return,
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
        };
        match job {
            Job::Append { done, .. } => done(Err(WriteError::Busy)),
            Job::Ack { done, .. } | Job::Probe(done) => done(Err(WriteError::Busy)),
            Job::Stop | Job::Retain { .. } => {}
        }
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
                    return parked.fail(&Failure::StreamUnreadable);
                }
            };
        }
        match poll {
            Poll::Ready(parked, events) => {
                let answers = Answers::events(std::slice::from_ref(&parked), &events);
                parked.answer(&answers);
            }
            Poll::Parked { earliest } => {
                if earliest {
                    let _ = self.timer.try_send(());
                }
            }
            Poll::Full(parked) => parked.fail(&Failure::TooManyParked),
            Poll::Closed(parked) => self.expire(|_| vec![parked]),
            Poll::Unknown(parked) => parked.fail(&Failure::ChangingTooFast),
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
            let answers = Answers::events(&group.replies, &group.events);
            self.spawn_answers(group.replies, answers);
        }
    }

    /// Answers `replies` with `answers` on workers, [`ANSWER_CHUNK`] replies per task.
    fn spawn_answers(&self, replies: Vec<Parked>, answers: Answers) {
        let mut replies = replies.into_iter().peekable();
        while replies.peek().is_some() {
            let chunk: Vec<Parked> = replies.by_ref().take(ANSWER_CHUNK).collect();
            let answers = answers.clone();
            self.spawn(Box::new(move || {
                for parked in chunk {
                    parked.answer(&answers);
                }
            }));
        }
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
        let answers = Answers {
            longpoll: Some(longpoll::timeout_response(stamp)),
            consumer: Some(Response::json(200, JSON_UTF8, &b"[]"[..])),
            in_process: Some(Ok(Polled::Timeout { timestamp: stamp })),
        };
        self.spawn_answers(replies, answers);
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

impl Answers {
    /// `events` rendered in each shape one of `waiting` needs.
    fn events(waiting: &[Parked], events: &[Arc<Event>]) -> Answers {
        let mut answers = Answers::default();
        for parked in waiting {
            match &parked.waiter {
                Waiter::LongPoll(category, _) => {
                    if answers.longpoll.is_none() {
                        answers.longpoll = Some(longpoll::events_response(category, events));
                    }
                }
                Waiter::Consumer(_) => {
                    if answers.consumer.is_none() {
                        let elements = events.iter().map(|e| &*e.data);
                        answers.consumer = Some(streams::elements_response(elements));
                    }
                }
                Waiter::InProcess(category, _) => {
                    if answers.in_process.is_none() {
                        answers.in_process = Some(longpoll::polled(category, events));
                    }
                }
            }
        }
        answers
    }
}

impl Parked {
    /// A request's long-poll, answered through `reply` in `api`'s shape.
    fn http(api: Api, category: &str, reply: Reply, peer: Option<SocketAddr>) -> Parked {
        let waiter = match api {
            Api::LongPoll => Waiter::LongPoll(category.into(), reply),
            Api::Streams => Waiter::Consumer(reply),
        };
        Parked { waiter, peer }
    }

    /// An in-process subscriber's long-poll on `category`, answered through `tx`.
    fn in_process(category: &str, tx: Sender<Result<Polled, Failure>>) -> Parked {
        let waiter = Waiter::InProcess(category.into(), tx);
        Parked { waiter, peer: None }
    }

    /// Answers with the answer of this waiter's shape, rendered in `answers`.
    fn answer(self, answers: &Answers) {
        const RENDERED: &str = "answers are rendered for every waiter's shape";
        match self.waiter {
            Waiter::LongPoll(_, reply) => reply(answers.longpoll.clone().expect(RENDERED)),
            Waiter::Consumer(reply) => reply(answers.consumer.clone().expect(RENDERED)),
            Waiter::InProcess(_, tx) => {
                // The caller may have stopped waiting; nobody is left to answer.
                let _ = tx.send(answers.in_process.clone().expect(RENDERED));
            }
        }
    }

    /// Answers with `failure`, in the shape of the API that parked.
    fn fail(self, failure: &Failure) {
        match self.waiter {
            Waiter::LongPoll(_, reply) => reply(failure.render(Api::LongPoll)),
            Waiter::Consumer(reply) => reply(failure.render(Api::Streams)),
            Waiter::InProcess(_, tx) => {
                let _ = tx.send(Err(failure.clone()));
            }
        }
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
