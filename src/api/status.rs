//! The status page: `GET /` answers one self-contained HTML page (`status.html`, inline
//! CSS and script, nothing fetched from elsewhere), and the page reads `GET /api/v1/status`,
//! a small JSON overview, every few seconds. Both need the same Basic credentials as the
//! APIs: a person opening `/` gets the browser's login dialog (a navigation keeps
//! `WWW-Authenticate`, [`super::edge`]), and the page's own requests then carry the
//! credentials the browser cached for the origin, its live tail included (an `EventSource`
//! on the subscribe path).
//!
//! The overview's path lies under `/api/`, which `--events-path` and `--publish-path` may
//! not take, so it never collides with them; `/` does collide if one of them is set to it,
//! and then that API keeps it and the page is not served.
//!
//! # Who sees what
//!
//! Any user with valid credentials may open the page. Names appear only where the user may
//! read: streams the user may consume (or public categories, `--public-subscribe`), their
//! owners (producer ids) and their consumers, and the parked polls of those categories.
//! Server-wide counts (all parked polls, the cap) are shown to every user, as `/metrics`
//! shows them.
//!
//! # Bounded work
//!
//! The overview is computed on a worker from its read connection. At most
//! [`MAX_STREAMS`] streams (the first by name the user may read) and [`MAX_CONSUMERS`]
//! consumers are listed, and the page says when more were left out. Counting a listed
//! stream's events and a consumer's lag walks an index over those events, like
//! `stream show` and the lag in `/metrics`. The parked polls are counted in one pass over
//! the parked replies, which `--max-parked` bounds.

use std::sync::Arc;

use serde_json::{Value, json};

use super::longpoll::is_public;
use super::{App, Failure, Method, Reply, Request, Response};
use crate::auth::Grants;
use crate::store::Reader;

/// Path of the page.
pub const PAGE_PATH: &str = "/";
/// Path of the JSON overview the page reads.
pub const OVERVIEW_PATH: &str = "/api/v1/status";

/// Most streams listed.
const MAX_STREAMS: usize = 100;
/// Most consumers listed, over all listed streams.
const MAX_CONSUMERS: usize = 200;
/// Most categories listed with their parked polls.
const MAX_CATEGORIES: usize = 100;

/// The page, compiled into the binary.
const PAGE: &str = include_str!("status.html");

/// What the page may load and run: only itself (its inline style and script) and requests
/// to its own origin; no frame may embed it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     script-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'";

/// `GET /`: the page, to a user with valid credentials.
pub(super) fn page(app: &App, reader: &mut Reader, req: Request, reply: Reply) {
    if let Err(failure) = checked(app, reader, &req) {
        return reply.send(failure.render(super::Api::Streams));
    }
    let response = Response::json(200, "text/html; charset=utf-8", PAGE.as_bytes())
        .with_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Cache-Control", "no-store");
    reply.send(response)
}

/// `GET /api/v1/status`: what the user may see of the server, as JSON.
pub(super) fn overview(app: &App, reader: &mut Reader, req: Request, reply: Reply) {
    let grants = match checked(app, reader, &req) {
        Ok(grants) => grants,
        Err(failure) => return reply.send(failure.render(super::Api::Streams)),
    };
    let public = &app.config.public_subscribe;
    let visible = |name: &str| grants.may_consume(name) || is_public(public, Some(name));
    let store = match reader.overview(visible, MAX_STREAMS, MAX_CONSUMERS) {
        Ok(store) => store,
        Err(e) => {
            let failure =
                Failure::from_store(&e, "status: reading the streams", Failure::StreamUnreadable);
            return reply.send(failure.render(super::Api::Streams));
        }
    };
    let streams: Vec<Value> = store
        .streams
        .iter()
        .map(|s| {
            let consumers: Vec<Value> = s
                .consumers
                .iter()
                .map(|c| {
                    json!({"consumer": c.consumer, "event_name": c.event_name,
                           "offset": c.offset, "lag": c.lag})
                })
                .collect();
            let s = &s.summary;
            json!({"name": s.name, "owner": s.owner, "events": s.events,
                   "last_seq": s.last_seq, "last_ms": s.last_ms, "consumers": consumers})
        })
        .collect();
    let body = json!({
        "user": user_name(&req),
        "events_path": app.config.events_path,
        "limits": {"streams": MAX_STREAMS, "consumers": MAX_CONSUMERS,
                   "categories": MAX_CATEGORIES},
        "streams": streams,
        "more_streams": store.more_streams,
        "more_consumers": store.more_consumers,
        "parked": parked(app, visible),
    });
    let body = serde_json::to_vec(&body).expect("JSON values always serialize");
    reply.send(Response::json(200, super::JSON_UTF8, body).with_header("Cache-Control", "no-store"))
}

/// The user's grants, or why the request is refused: a method other than GET, or
/// credentials that do not check.
fn checked(app: &App, reader: &Reader, req: &Request) -> Result<Arc<Grants>, Failure> {
    if req.method != Method::Get {
        return Err(Failure::MethodNotAllowed);
    }
    app.authenticate(reader, req)
}

/// The name the credentials claim (they were checked already).
fn user_name(req: &Request) -> Option<String> {
    req.header("Authorization")
        .and_then(crate::auth::parse_basic)
        .map(|c| c.user)
}

/// Parked polls (and event streams): the server's total and cap, and per category the
/// user may read, most first.
fn parked(app: &App, visible: impl Fn(&str) -> bool) -> Value {
    let registry = &app.runtime.registry;
    let mut categories: Vec<(Arc<str>, usize)> = registry
        .parked_by_category()
        .into_iter()
        .filter(|(category, _)| visible(category))
        .collect();
    categories.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let more = categories.len() > MAX_CATEGORIES;
    categories.truncate(MAX_CATEGORIES);
    let categories: Vec<Value> = categories
        .iter()
        .map(|(category, parked)| json!({"category": &**category, "parked": parked}))
        .collect();
    json!({
        "total": registry.parked(),
        "max": app.config.max_parked,
        "categories": categories,
        "more_categories": more,
    })
}
