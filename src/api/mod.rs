//! Routes and handlers for both APIs, independent of the HTTP engine.
//!
//! `App::admit` picks the lane a decoded request waits in (`admission`), or refuses it;
//! the server queues it there, and a worker calls
//! [`App::handle`], which routes it. A handler turns the [`Request`] into a typed call, runs
//! it against the store, and answers through its [`Reply`]: at once, or through the
//! [`Runtime`] after the writer commits or when a parked long-poll is woken or expires
//! ([`runtime`] traces both paths). Every failure is a [`Failure`] from one catalogue
//! ([`error`]), which each API renders in its own contract: the streams API as JSON strings
//! (`"Bad Request - <why>"`), the long-poll API as golongpoll's `{"error": …}` bodies.

mod admission;
#[cfg(feature = "postgres")]
pub(crate) mod catch_up;
pub mod check;
mod edge;
pub mod error;
pub mod longpoll;
mod query;
pub mod runtime;
mod sse;
mod status;
pub mod streams;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use admission::Incoming;
pub use error::{Api, Failure};
pub use runtime::{Parked, Runtime};

use crate::auth::{Authenticator, Checked, Grants, Stored};
use crate::config::Config;
use crate::store::Reader;
use crate::store::writer::{Done, Job};

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
    /// The headers the APIs read (credentials, client ids, and what browsers and proxies
    /// send: `Origin`, `Sec-Fetch-Mode`, `X-Forwarded-For`…), in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
    /// The TCP peer's address (the proxy's, behind a reverse proxy: see [`App::client`]).
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
    /// Headers besides `Content-Length`, which the HTTP layer adds. Fixed values are
    /// borrowed, so an answer shared by many waiters is cloned without copying them.
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    /// The body, shared so one rendering can answer many waiters.
    pub body: Arc<[u8]>,
    /// For a streamed answer (Server-Sent Events): this response is only the head, and the
    /// connection goes to the [`Handover`] once the head is written.
    pub stream: Option<Handover>,
}

/// A connection handed over for an answer that goes on (Server-Sent Events), written to
/// without ever blocking the thread that writes.
pub trait Pipe: Send {
    /// Writes what the connection takes of `buf` now: the bytes taken, `Ok(0)` when its
    /// buffers are full. An error means the connection is lost.
    fn try_write(&mut self, buf: &[u8]) -> std::io::Result<usize>;
}

/// What takes a streamed answer's connection once its head is written: `Some` pipe, or
/// `None` when the connection could not be handed over (then the HTTP layer answered
/// with an error instead of the head). Called at most once.
#[derive(Clone)]
pub struct Handover(Arc<std::sync::Mutex<Option<HandoverFn>>>);

/// The receiving end of a [`Handover`].
type HandoverFn = Box<dyn FnOnce(Option<Box<dyn Pipe>>) + Send>;

impl Handover {
    /// A handover that passes the connection to `take`.
    pub fn new(take: impl FnOnce(Option<Box<dyn Pipe>>) + Send + 'static) -> Handover {
        Handover(Arc::new(std::sync::Mutex::new(Some(Box::new(take)))))
    }

    /// Hands `pipe` over (the first call only).
    pub fn give(&self, pipe: Option<Box<dyn Pipe>>) {
        let take = crate::lock::lock(&self.0).take();
        if let Some(take) = take {
            take(pipe);
        }
    }
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handover")
    }
}

/// A request's way back to its connection: the HTTP layer's responder, which writes the
/// answer in the order the connection sent its requests. Answers exactly once; dropped
/// unanswered, the HTTP layer answers 500.
pub struct Reply(Box<dyn FnOnce(Response) + Send>);

impl Reply {
    /// A reply that hands its answer to `send`.
    pub fn new(send: impl FnOnce(Response) + Send + 'static) -> Reply {
        Reply(Box::new(send))
    }

    /// Answers the request.
    pub fn send(self, response: Response) {
        (self.0)(response)
    }
}

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
            headers: vec![("Content-Type", content_type.into())],
            body: body.into(),
            stream: None,
        }
    }

    /// A streams-API answer: a JSON string body.
    pub fn message(status: u16, text: &str) -> Response {
        let body = serde_json::to_vec(text).expect("a str always serializes");
        Response::json(status, JSON_UTF8, body)
    }

    /// Adds a header.
    pub fn with_header(
        mut self,
        name: &'static str,
        value: impl Into<Cow<'static, str>>,
    ) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

/// The routes: what handlers share to decide and answer (settings, credentials, metrics),
/// and the [`Runtime`] through which whatever answers later goes.
pub struct App {
    pub(crate) config: Config,
    pub(crate) auth: Authenticator,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) runtime: Runtime,
    /// Health checks admitted and not answered yet.
    pub(crate) health_checks: Arc<std::sync::atomic::AtomicUsize>,
}

impl App {
    /// The API a request to `path` is for: long-poll on its two paths, streams elsewhere.
    pub(crate) fn api_of(&self, path: &str) -> Api {
        if path == self.config.events_path || path == self.config.publish_path {
            Api::LongPoll
        } else {
            Api::Streams
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
            "status-page" => status::page(self, reader, req, reply),
            "status" => status::overview(self, reader, req, reply),
            #[cfg(feature = "test-panic-route")]
            "panic" => panic!("panic injected through the test route"),
            _ => reply.send(Failure::NotFound.render(Api::Streams)),
        }
    }

    /// The route a request belongs to, also its metrics label.
    fn route(&self, req: &Request) -> &'static str {
        let path = req.path.as_str();
        if HEALTH_PATHS.contains(&path) {
            "health"
        } else if path == "/metrics" {
            "metrics"
        } else if path == status::OVERVIEW_PATH {
            "status"
        } else if path.starts_with("/api/v1/") {
            "streams"
        } else if path == self.config.events_path {
            "subscribe"
        } else if path == self.config.publish_path {
            "publish"
        } else if path == status::PAGE_PATH {
            "status-page"
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
            let client = self
                .client(req)
                .map_or_else(|| "-".into(), |ip| ip.to_string());
            let request = format!("{} {}", method_name(&req.method), req.path);
            (request, format!("user={user} client={client}"))
        });
        let metrics = self.metrics.clone();
        Reply::new(move |response: Response| {
            let status = response.status;
            reply.send(response);
            let took = started.elapsed();
            metrics.request(route, status, took);
            if let Some((request, who)) = line {
                let ms = took.as_secs_f64() * 1000.0;
                crate::log::info(&format!("{request} {status} {ms:.1}ms {who}"));
            }
        })
    }

    /// 200 when the database answers a read and commits a write, 503 otherwise. Needs no
    /// credentials; answers after the writer's heartbeat commits, without holding a worker.
    fn health(&self, reader: &mut Reader, reply: Reply) {
        let unavailable = || Response::json(503, JSON_UTF8, &b"{\"status\":\"unavailable\"}"[..]);
        if let Err(e) = reader.user("") {
            crate::log::error(&format!("health: the database does not answer: {e}"));
            return reply.send(unavailable());
        }
        self.runtime.submit(Job::Heartbeat(Done::new(move |result| {
            reply.send(match result {
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
            return reply.send(failure.render(Api::Streams));
        }
        let lag = reader.consumer_lag().unwrap_or_else(|e| {
            crate::log::error(&format!("metrics: reading consumer lag failed: {e}"));
            Vec::new()
        });
        let held = reader.retention_held().unwrap_or_else(|e| {
            crate::log::error(&format!(
                "metrics: reading what retention holds failed: {e}"
            ));
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
            parked: self.runtime.registry.parked(),
            database_bytes,
            lag,
            held,
        };
        let body = self.metrics.render(&gauges);
        reply.send(Response::json(
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
        let client = self.client(req);
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
                let failure =
                    Failure::from_store(&e, "reading credentials", Failure::CredentialsUnreadable);
                Err(failure)
            }
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
