//! The streams API (`/api/v1/streams/<stream>/events…`): one producer per stream (a second
//! one is refused with 423), consumers reading by event name from server-kept offsets,
//! cumulative ACKs. Every answer is a JSON value with `application/json; charset=utf-8`;
//! failures are JSON strings ([`Failure`] in the streams shape).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use uuid::Uuid;

use super::error::{Api, Failure};
use super::query::{Form, decode};
use super::{App, Body, JSON_UTF8, Method, Parked, Reply, Request, Response, Want};
use crate::event::{Event, Start};
use crate::store::Reader;
use crate::store::writer::{Done, Job, Payload};

const PREFIX: &str = "/api/v1/streams/";

/// Longest stream name, in bytes after percent-decoding.
pub const MAX_STREAM_NAME: usize = 1024;
/// Longest producer or consumer id, in bytes.
pub(crate) const MAX_CLIENT_ID: usize = 255;

/// An array of stored elements.
pub(crate) fn elements_response<'a>(elements: impl Iterator<Item = &'a str>) -> Response {
    let mut body = String::from("[");
    for (i, element) in elements.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(element);
    }
    body.push(']');
    Response::json(200, JSON_UTF8, body.into_bytes())
}

/// Validates a stream name taken from the path; `Err` says why it is not one.
pub fn stream_name(raw: &str) -> Result<String, String> {
    let name = decode(raw, false).ok_or("stream name is not valid percent-encoded UTF-8")?;
    check_stream_name(&name)?;
    Ok(name)
}

/// Checks an already decoded stream (or category) name.
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("stream name is empty".into());
    }
    if name.len() > MAX_STREAM_NAME {
        return Err(format!(
            "stream name is longer than {MAX_STREAM_NAME} bytes"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("stream name holds control characters".into());
    }
    Ok(())
}

/// Whether `id` may be a producer or consumer id: 1-255 bytes without control characters.
pub(crate) fn valid_client_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_CLIENT_ID && !id.chars().any(char::is_control)
}

/// The producer or consumer id from header `header`.
fn client_id(req: &Request, header: &str) -> Result<String, String> {
    let Some(value) = req.header(header) else {
        return Err(format!("missing {header} header"));
    };
    if !valid_client_id(value) {
        return Err(format!(
            "{header} must be 1-{MAX_CLIENT_ID} bytes without control characters"
        ));
    }
    Ok(value.to_owned())
}

enum Route<'a> {
    Events(&'a str),
    Event(&'a str, &'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix(PREFIX)?;
    let mut parts = rest.split('/');
    let stream = parts.next()?;
    if parts.next()? != "events" {
        return None;
    }
    match (parts.next(), parts.next()) {
        (None, _) => Some(Route::Events(stream)),
        (Some(id), None) => Some(Route::Event(stream, id)),
        _ => None,
    }
}

/// A streams-API call, parsed, checked and authorised.
enum Call {
    /// Append an event to `stream` as `producer`.
    Append {
        stream: String,
        producer: String,
        name: String,
        fields: String,
    },
    /// Read `consumer`'s next events named `name`, waiting up to `timeout` for some.
    Consume {
        stream: String,
        consumer: String,
        name: String,
        limit: usize,
        timeout: Option<Duration>,
    },
    /// Move `consumer`'s offset up to event `id`.
    Ack {
        stream: String,
        consumer: String,
        id: Uuid,
    },
}

/// Serves a request under `/api/v1/`.
pub fn handle(app: &App, reader: &mut Reader, req: Request, reply: Reply) {
    let call = match parse(app, reader, &req) {
        Ok(call) => call,
        Err(failure) => return reply.send(failure.render(Api::Streams)),
    };
    match call {
        Call::Append {
            stream,
            producer,
            name,
            fields,
        } => app.runtime.submit(Job::Append {
            stream,
            producer: Some(producer),
            payload: Payload::Element { name, fields },
            done: Done::new(move |result: Result<Arc<Event>, _>| {
                reply.send(match result {
                    Ok(event) => Response::message(200, &event.id.to_string()),
                    Err(e) => Failure::from(e).render(Api::Streams),
                })
            }),
        }),
        Call::Consume {
            stream,
            consumer,
            name,
            limit,
            timeout,
        } => {
            let view = match reader.consume(&stream, &consumer, &name, limit) {
                Ok(Some(view)) => view,
                Ok(None) => return reply.send(Failure::NoStream(stream).render(Api::Streams)),
                Err(e) => {
                    let failure =
                        Failure::from_store(&e, "consume read", Failure::StreamUnreadable);
                    return reply.send(failure.render(Api::Streams));
                }
            };
            match timeout {
                Some(timeout) if view.events.is_empty() => {
                    let want = Want {
                        start: Start::After(view.hwm),
                        filter: Some(name),
                        limit,
                        timeout,
                    };
                    let parked = Parked::http(Api::Streams, &stream, reply, req.remote);
                    app.runtime.wait(reader, &stream, want, parked);
                }
                _ => reply.send(elements_response(view.events.iter().map(String::as_str))),
            }
        }
        Call::Ack {
            stream,
            consumer,
            id,
        } => app.runtime.submit(Job::Ack {
            stream,
            consumer,
            id,
            done: Done::new(move |result| {
                reply.send(match result {
                    Ok(()) => Response::message(200, "OK"),
                    Err(e) => Failure::from(e).render(Api::Streams),
                })
            }),
        }),
    }
}

/// Authenticates, routes and checks a request, in that order: credentials before anything
/// else, then the body's size, then its content, then the user's grants.
fn parse(app: &App, reader: &Reader, req: &Request) -> Result<Call, Failure> {
    let grants = app.authenticate(reader, req)?;
    let call = match (route(&req.path), &req.method) {
        (None, _) => return Err(Failure::NotFound),
        (Some(Route::Events(stream)), Method::Post) => append(app, stream, req)?,
        (Some(Route::Events(stream)), Method::Get) => consume(app, stream, req)?,
        (Some(Route::Event(stream, id)), Method::Post) => ack(app, stream, id, req)?,
        (Some(_), _) => return Err(Failure::MethodNotAllowed),
    };
    let allowed = match &call {
        Call::Append { stream, .. } => grants.may_produce(stream),
        Call::Consume { stream, .. } | Call::Ack { stream, .. } => grants.may_consume(stream),
    };
    match allowed {
        true => Ok(call),
        false => Err(Failure::Forbidden),
    }
}

/// The top-level members an event may have, stored verbatim.
const MEMBERS: [&str; 4] = ["event", "system", "trigger", "payload"];

/// Checks a posted event and renders its stored members; returns the event name too.
pub fn validate_event(body: &[u8]) -> Result<(String, String), String> {
    let members: HashMap<String, &RawValue> =
        serde_json::from_slice(body).map_err(|e| format!("body is not a JSON object: {e}"))?;
    crate::event::check_json(body)?;
    let event = members.get("event").ok_or("missing 'event' object")?;
    let event: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(event.get()).map_err(|_| "'event' must be an object")?;
    let name = match event.get("name") {
        Some(serde_json::Value::String(name)) if !name.is_empty() => name.clone(),
        _ => return Err("'event.name' must be a non-empty string".into()),
    };
    if let Some(version) = event.get("version")
        && version.as_u64().is_none_or(|v| v < 1)
    {
        return Err("'event.version' must be a positive integer".into());
    }
    for member in ["system", "trigger"] {
        if let Some(raw) = members.get(member)
            && !raw.get().starts_with('{')
        {
            return Err(format!("'{member}' must be an object"));
        }
    }
    let mut fields = String::with_capacity(body.len() + 16);
    for member in MEMBERS {
        if let Some(raw) = members.get(member) {
            fields.push_str(",\"");
            fields.push_str(member);
            fields.push_str("\":");
            fields.push_str(raw.get());
        }
    }
    Ok((name, fields))
}

/// The request's body, or why it cannot be read: over the limit, or cut short.
pub(crate) fn body<'r>(app: &App, req: &'r Request) -> Result<&'r [u8], Failure> {
    match &req.body {
        Body::TooLarge => Err(Failure::TooLarge(app.config.max_body)),
        Body::Unreadable => Err(Failure::Unreadable),
        Body::Bytes(body) => Ok(body),
    }
}

/// A malformed request.
fn bad(why: impl Into<std::borrow::Cow<'static, str>>) -> Failure {
    Failure::BadRequest(why.into())
}

fn append(app: &App, raw_stream: &str, req: &Request) -> Result<Call, Failure> {
    let body = body(app, req)?;
    let stream = stream_name(raw_stream).map_err(bad)?;
    let producer = client_id(req, "X-Producer-ID").map_err(bad)?;
    let (name, fields) = validate_event(body).map_err(bad)?;
    Ok(Call::Append {
        stream,
        producer,
        name,
        fields,
    })
}

fn consume(app: &App, raw_stream: &str, req: &Request) -> Result<Call, Failure> {
    let max = app.config.max_limit;
    let max_timeout = app.config.longpoll_max_timeout;
    let stream = stream_name(raw_stream).map_err(bad)?;
    let form = Form::parse(&req.query);
    if form.malformed {
        return Err(bad("query string is not valid percent-encoded UTF-8"));
    }
    let name = match form.single("eventName").map_err(bad)? {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => return Err(bad("missing or empty 'eventName' parameter")),
    };
    let limit = form
        .single("limit")
        .map_err(bad)?
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| (1..=max).contains(l))
        .ok_or_else(|| bad(format!("'limit' must be an integer from 1 to {max}")))?;
    let timeout = match form.single("timeout").map_err(bad)? {
        None => None,
        Some(t) => Some(
            t.parse::<u64>()
                .ok()
                .filter(|t| (1..=max_timeout).contains(t))
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    bad(format!(
                        "'timeout' must be an integer from 1 to {max_timeout}"
                    ))
                })?,
        ),
    };
    let consumer = client_id(req, "X-Consumer-ID").map_err(bad)?;
    Ok(Call::Consume {
        stream,
        consumer,
        name,
        limit,
        timeout,
    })
}

fn ack(app: &App, raw_stream: &str, raw_id: &str, req: &Request) -> Result<Call, Failure> {
    let body = body(app, req)?;
    let stream = stream_name(raw_stream).map_err(bad)?;
    let id = decode(raw_id, false)
        .and_then(|id| Uuid::parse_str(&id).ok())
        .ok_or_else(|| bad("event id is not a UUID"))?;
    let consumer = client_id(req, "X-Consumer-ID").map_err(bad)?;
    let body = std::str::from_utf8(body).map_err(|_| bad("body is not UTF-8"))?;
    let form = Form::parse(body.trim());
    match form.single("action").map_err(bad)? {
        Some("ACK") => Ok(Call::Ack {
            stream,
            consumer,
            id,
        }),
        Some(_) => Err(bad("unknown 'action'; only action=ACK is supported")),
        None => Err(bad("missing 'action=ACK' in the body")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_events() {
        let ok =
            br#"{"event":{"name":"OrderPlaced","version":1},"system":{"id":"a"},"payload":[1,2]}"#;
        let (name, fields) = validate_event(ok).unwrap();
        assert_eq!(name, "OrderPlaced");
        assert_eq!(
            fields,
            r#","event":{"name":"OrderPlaced","version":1},"system":{"id":"a"},"payload":[1,2]"#
        );
        for bad in [
            &br#"[]"#[..],
            br#"{"event":1}"#,
            br#"{"event":{"name":""}}"#,
            br#"{"event":{"name":"a","version":0}}"#,
            br#"{"event":{"name":"a","version":1.5}}"#,
            br#"{"event":{"name":"a"},"system":null}"#,
            br#"{"event":{"name":"a"},"trigger":"x"}"#,
            br#"not json"#,
        ] {
            assert!(
                validate_event(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn checks_stream_names() {
        assert_eq!(stream_name("a%2Fb").as_deref(), Ok("a/b"));
        assert!(stream_name("").is_err());
        assert!(stream_name("a%00b").is_err());
        assert!(stream_name("%ff").is_err());
        assert!(stream_name(&"x".repeat(1025)).is_err());
        assert!(stream_name(&"x".repeat(1024)).is_ok());
    }
}
