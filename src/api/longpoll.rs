//! The long-poll API in golongpoll's wire format: subscribe (`/events`) and publish
//! (`/publish`). Subscribe answers everything, errors included, with HTTP 200 and a JSON body
//! (golongpoll's contract); only a failed authentication is a real 401, because both
//! official clients treat any non-200 as a failure and retry.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::{Api, Failure};
use super::query::Form;
use super::streams::{MAX_CLIENT_ID, valid_client_id};
use super::{App, Body, Method, Parked, Reply, Request, Response, Want};
use crate::auth::Grants;
use crate::event::{Event, Start, push_json_str};
use crate::store::Reader;
use crate::store::writer::{Done, Job, Payload};

/// Content type of every long-poll answer (golongpoll's).
const JSON: &str = "application/json";

/// A long-poll answer with golongpoll's headers.
pub(super) fn golongpoll_response(status: u16, body: impl Into<Arc<[u8]>>) -> Response {
    Response::json(status, JSON, body)
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Cache-Control", "no-cache, no-store, must-revalidate")
        .with_header("Pragma", "no-cache")
        .with_header("Expires", "0")
}

/// The timeout answer with the given timestamp.
pub(crate) fn timeout_response(timestamp: u64) -> Response {
    let body = format!("{{\"timeout\":\"no events before timeout\",\"timestamp\":{timestamp}}}");
    golongpoll_response(200, body.into_bytes())
}

/// An events answer for `category`.
pub(crate) fn events_response(category: &str, events: &[Arc<Event>]) -> Response {
    let mut quoted = String::new();
    push_json_str(&mut quoted, category);
    let mut body =
        String::with_capacity(16 + events.iter().map(|e| e.data.len() + 100).sum::<usize>());
    body.push_str("{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        push_event_object(&mut body, &quoted, e);
    }
    body.push_str("]}");
    golongpoll_response(200, body.into_bytes())
}

/// Writes event `e` of `category` into `out` as the object a long-poll answer carries.
pub(super) fn event_object(out: &mut String, category: &str, e: &Event) {
    let mut quoted = String::new();
    push_json_str(&mut quoted, category);
    push_event_object(out, &quoted, e);
}

/// [`event_object`] with the category already quoted.
fn push_event_object(out: &mut String, quoted_category: &str, e: &Event) {
    out.push_str("{\"timestamp\":");
    out.push_str(&e.ts.to_string());
    out.push_str(",\"category\":");
    out.push_str(quoted_category);
    out.push_str(",\"data\":");
    out.push_str(&e.data);
    out.push_str(",\"id\":\"");
    out.push_str(
        e.id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
    out.push_str("\"}");
}

/// Whether `category` is open without credentials by one of `patterns`.
pub(super) fn is_public(patterns: &[String], category: Option<&str>) -> bool {
    category.is_some_and(|c| patterns.iter().any(|p| crate::auth::glob_match(p, c)))
}

/// Who may do what: `Ok(None)` for a public category, the user's grants otherwise.
fn authenticate(
    app: &App,
    reader: &Reader,
    req: &Request,
    public: &[String],
    category: Option<&str>,
) -> Result<Option<Arc<Grants>>, Failure> {
    if is_public(public, category) {
        return Ok(None);
    }
    app.authenticate(reader, req).map(Some)
}

/// Refuses what `grants` do not allow; public categories (no grants) allow everything.
fn check_grant(
    grants: Option<Arc<Grants>>,
    allowed: impl FnOnce(&Grants) -> bool,
) -> Result<(), Failure> {
    match grants {
        Some(grants) if !allowed(&grants) => Err(Failure::Forbidden),
        _ => Ok(()),
    }
}

/// golongpoll's answer to a subscribe without a usable category.
const INVALID_SUBSCRIPTION: &str = "Invalid subscription category, must be 1-1024 characters long.";
/// golongpoll's answer to a publish without a usable category.
const INVALID_CATEGORY: &str = "Invalid or missing 'category' arg, must be 1-1024 characters long.";
/// golongpoll's answer to a publish without data (or with `null`).
const MISSING_DATA: &str = "Invalid or missing 'data' arg, must be non-nil.";

/// Whether a category is one a stream could have: 1-1024 bytes, no control characters.
fn valid_category(category: &str) -> bool {
    super::streams::check_stream_name(category).is_ok()
}

/// Parses and checks subscribe parameters, in golongpoll's order and wording:
/// `(category, timeout in seconds, start)` or the error message.
pub fn subscribe_params(query: &str, max_timeout: u64) -> Result<(String, u64, Start), String> {
    let form = Form::parse(query);
    let timeout = form
        .first("timeout")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| (1..=max_timeout).contains(t))
        .ok_or_else(|| format!("Invalid or missing 'timeout' arg.  Must be 1-{max_timeout}."))?;
    let (category, start) = form_params(&form)?;
    Ok((category, timeout, start))
}

/// The subscribe parameters besides `timeout` (all a stream of events takes):
/// `(category, start)` or golongpoll's error message.
pub(super) fn stream_params(query: &str) -> Result<(String, Start), String> {
    form_params(&Form::parse(query))
}

/// [`stream_params`] from the parsed query.
fn form_params(form: &Form) -> Result<(String, Start), String> {
    let present = |name| form.first(name).filter(|v| !v.is_empty());
    let category = form.first("category").unwrap_or_default();
    if !valid_category(category) {
        return Err(INVALID_SUBSCRIPTION.into());
    }
    let since = match present("since_time") {
        None => None,
        // golongpoll takes any int64; a time before the epoch means "everything".
        Some(raw) => Some(
            raw.parse::<i64>()
                .map_err(|_| "Invalid 'since_time' arg.".to_owned())?
                .max(0) as u64,
        ),
    };
    let last_id = match present("last_id") {
        None => None,
        Some(_) if since.is_none() => {
            return Err("Must provide 'since_time' arg when providing 'last_id'.".into());
        }
        Some(raw) => Some(
            uuid::Uuid::parse_str(raw)
                .map_err(|_| "Param 'last_id' was not a valid UUID.".to_owned())?,
        ),
    };
    let start = match since {
        None => Start::Now,
        Some(ms) => Start::Since { ms, last_id },
    };
    Ok((category.to_owned(), start))
}

/// `GET` (or `POST`) on the subscribe path; a stream of events for a client that accepts
/// one.
pub fn subscribe(app: &App, reader: &mut Reader, req: Request, reply: Reply) {
    if super::sse::wanted(&req) {
        return super::sse::subscribe(app, reader, req, reply);
    }
    let max = app.config.longpoll_max_timeout;
    let params = |query: &str| subscribe_params(query, max).map(|(c, t, s)| (c, (t, s)));
    let (category, (timeout, start)) = match subscription(app, reader, &req, params) {
        Ok(params) => params,
        Err(failure) => return reply.send(failure.render(Api::LongPoll)),
    };
    let parked = Parked::http(Api::LongPoll, &category, reply, req.remote);
    let want = Want {
        start,
        filter: None,
        limit: app.config.longpoll_max_batch,
        timeout: Duration::from_secs(timeout),
    };
    app.runtime.wait(reader, &category, want, parked);
}

/// Authenticates and checks a subscribe whose query `params` parses into the category and
/// what else the subscribe takes.
pub(super) fn subscription<T>(
    app: &App,
    reader: &Reader,
    req: &Request,
    params: impl FnOnce(&str) -> Result<(String, T), String>,
) -> Result<(String, T), Failure> {
    let public = &app.config.public_subscribe;
    // The query is read once more below; only open categories need it before auth.
    let category = match public.is_empty() {
        true => None,
        false => Form::parse(&req.query).first("category").map(str::to_owned),
    };
    let grants = authenticate(app, reader, req, public, category.as_deref())?;
    let (category, rest) =
        params(&req.query).map_err(|message| Failure::BadSubscription(message.into()))?;
    check_grant(grants, |g| g.may_consume(&category))?;
    Ok((category, rest))
}

#[derive(Deserialize)]
struct PublishBody {
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// Decodes a publish body as golongpoll does: a JSON object (serde would also take an
/// array for a struct; Go's decoder does not).
fn parse_publish(body: &[u8]) -> Option<PublishBody> {
    let text = std::str::from_utf8(body).ok()?;
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// Checks a publish body; `Ok((category, data))` with `data` as posted, or golongpoll's
/// error message.
pub fn check_publish(body: &[u8]) -> Result<(String, String), &'static str> {
    let parsed = parse_publish(body).ok_or("Invalid POST body json.")?;
    crate::event::check_json(body).map_err(|_| "Invalid POST body json.")?;
    let category = parsed.category.unwrap_or_default();
    if !valid_category(&category) {
        return Err(INVALID_CATEGORY);
    }
    let data = parsed.data.ok_or(MISSING_DATA)?;
    Ok((category, data.get().to_owned()))
}

/// `POST` on the publish path.
pub fn publish(app: &App, reader: &mut Reader, req: Request, reply: Reply) {
    let (stream, producer, data) = match publication(app, reader, &req) {
        Ok(checked) => checked,
        Err(failure) => return reply.send(failure.render(Api::LongPoll)),
    };
    app.runtime.submit(Job::Append {
        stream,
        producer,
        payload: Payload::Data(data),
        done: Done::new(move |result| {
            reply.send(match result {
                Ok(_) => golongpoll_response(200, &b"{\"success\": true}"[..]),
                Err(e) => Failure::from(e).render(Api::LongPoll),
            })
        }),
    });
}

/// Authenticates and checks a publish: `(category, producer, data)`.
fn publication(
    app: &App,
    reader: &Reader,
    req: &Request,
) -> Result<(String, Option<String>, String), Failure> {
    let public = &app.config.public_publish;
    let category = match &req.body {
        Body::Bytes(body) if !public.is_empty() => parse_publish(body).and_then(|b| b.category),
        _ => None,
    };
    let grants = authenticate(app, reader, req, public, category.as_deref())?;
    if req.method != Method::Post {
        return Err(Failure::MethodNotAllowed);
    }
    let body = super::streams::body(app, req)?;
    let (category, data) = check_publish(body).map_err(|m| Failure::BadRequest(m.into()))?;
    check_grant(grants, |g| g.may_produce(&category))?;
    let producer = match req.header("X-Producer-ID") {
        None => None,
        Some(p) if valid_client_id(p) => Some(p.to_owned()),
        Some(_) => {
            return Err(Failure::BadRequest(
                format!(
                    "Invalid 'X-Producer-ID' header, must be 1-{MAX_CLIENT_ID} bytes without \
                     control characters."
                )
                .into(),
            ));
        }
    };
    Ok((category, producer, data))
}

/// An in-process publish: the checks of `POST /publish` (without a producer id), then the
/// new event's id once it is durable. Blocks until the writer commits.
pub(crate) fn publish_local(
    app: &App,
    category: &str,
    data: &serde_json::Value,
) -> Result<uuid::Uuid, Failure> {
    if !valid_category(category) {
        return Err(Failure::BadRequest(INVALID_CATEGORY.into()));
    }
    if data.is_null() {
        return Err(Failure::BadRequest(MISSING_DATA.into()));
    }
    if app.runtime.stopping() {
        return Err(Failure::Stopping);
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    app.runtime.submit(Job::Append {
        stream: category.to_owned(),
        producer: None,
        payload: Payload::Data(data.to_string()),
        done: Done::new(move |result| {
            let _ = tx.send(result);
        }),
    });
    match rx.recv() {
        Ok(result) => Ok(result?.id),
        Err(_) => Err(Failure::Stopping),
    }
}

/// An in-process subscribe: the same checks and selection as `GET /events`, the events
/// handed over as they are (no JSON in between). Blocks until events come, the timeout
/// passes, or the server stops.
pub(crate) fn subscribe_local(
    app: &App,
    reader: &mut Reader,
    category: &str,
    start: Start,
    timeout: Duration,
) -> Result<Polled, Failure> {
    let max = app.config.longpoll_max_timeout;
    if !(1..=max).contains(&timeout.as_secs()) {
        let message = format!("Invalid or missing 'timeout' arg.  Must be 1-{max}.");
        return Err(Failure::BadSubscription(message.into()));
    }
    if !valid_category(category) {
        return Err(Failure::BadSubscription(INVALID_SUBSCRIPTION.into()));
    }
    let want = Want {
        start,
        filter: None,
        limit: app.config.longpoll_max_batch,
        timeout,
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    app.runtime
        .wait(reader, category, want, Parked::in_process(category, tx));
    rx.recv().map_err(|_| Failure::Stopping)?
}

/// An event as long-poll subscribers receive it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Commit time, epoch milliseconds.
    pub timestamp: u64,
    /// The category (stream) it belongs to.
    pub category: String,
    /// The event id (`last_id` when resuming).
    pub id: uuid::Uuid,
    /// The published data, or the streams-API element.
    pub data: serde_json::Value,
}

/// The answer to an in-process subscribe.
#[derive(Debug, Clone, PartialEq)]
pub enum Polled {
    /// Events, oldest first.
    Events(Vec<Received>),
    /// No event before the timeout; resume from `timestamp`.
    Timeout {
        /// The server's time of the answer (`since_time` for the next poll).
        timestamp: u64,
    },
}

/// `events` of `category` for an in-process subscriber: what `GET /events` would send.
pub(crate) fn polled(category: &str, events: &[Arc<Event>]) -> Result<Polled, Failure> {
    let received = events.iter().map(|e| {
        let data = serde_json::from_str(&e.data).map_err(|err| {
            // Stored data was checked as JSON before it was committed.
            crate::log::error(&format!("event {} holds invalid JSON: {err}", e.id));
            Failure::StreamUnreadable
        })?;
        Ok(Received {
            timestamp: e.ts,
            category: category.to_owned(),
            id: e.id,
            data,
        })
    });
    Ok(Polled::Events(received.collect::<Result<_, Failure>>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_params_in_order() {
        let err = |q| subscribe_params(q, 110).unwrap_err();
        assert_eq!(err(""), "Invalid or missing 'timeout' arg.  Must be 1-110.");
        assert_eq!(
            err("timeout=111&category=a"),
            "Invalid or missing 'timeout' arg.  Must be 1-110."
        );
        assert_eq!(
            err("timeout=5"),
            "Invalid subscription category, must be 1-1024 characters long."
        );
        assert_eq!(
            err("timeout=5&category=a&since_time=x"),
            "Invalid 'since_time' arg."
        );
        assert_eq!(
            err("timeout=5&category=a&last_id=x"),
            "Must provide 'since_time' arg when providing 'last_id'."
        );
        assert_eq!(
            err("timeout=5&category=a&since_time=1&last_id=x"),
            "Param 'last_id' was not a valid UUID."
        );
        let (c, t, s) = subscribe_params("timeout=5&category=a&since_time=&last_id=", 110).unwrap();
        assert_eq!((c.as_str(), t, s), ("a", 5, Start::Now));
        let id = "{7C17587A-3437-4861-BEF7-8F29905589E4}";
        let (_, _, s) = subscribe_params(
            &format!("timeout=5&category=a&since_time=-4&last_id={id}"),
            110,
        )
        .unwrap();
        assert!(matches!(
            s,
            Start::Since {
                ms: 0,
                last_id: Some(_)
            }
        ));
    }
}
