//! The streams API (`/api/v1/streams/<stream>/events…`), as the seed document specifies:
//! one producer per stream, consumers reading by event name from server-kept offsets,
//! cumulative ACKs. Every answer is a JSON value with `application/json; charset=utf-8`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use uuid::Uuid;

use super::query::{Form, decode};
use super::{App, Body, JSON_UTF8, Method, Parked, ParkedKind, Reply, Request, Response, Want};
use crate::auth::Grants;
use crate::event::{Event, Start};
use crate::store::Reader;
use crate::store::writer::{Job, Payload, WriteError};

const PREFIX: &str = "/api/v1/streams/";

/// Why a broken body (cut short, badly chunked, framed two ways) is refused.
const UNREADABLE: &str = "could not read the request body";

/// Longest stream name, in bytes after percent-decoding.
pub const MAX_STREAM_NAME: usize = 1024;
/// Longest producer or consumer id, in bytes.
const MAX_CLIENT_ID: usize = 255;

/// A streams-API failure answer: `"<Status text> - <why>"`.
pub(crate) fn failure(status: u16, why: &str) -> Response {
    let text = match status {
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    Response::message(status, &format!("{text} - {why}"))
}

fn bad_request(why: &str) -> Response {
    failure(400, why)
}

/// The user may not do this to this stream.
fn forbidden() -> Response {
    Response::message(403, "Forbidden")
}

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

/// The producer or consumer id from header `header`.
fn client_id(req: &Request, header: &str) -> Result<String, String> {
    let Some(value) = req.header(header) else {
        return Err(format!("missing {header} header"));
    };
    if value.is_empty() || value.len() > MAX_CLIENT_ID || value.chars().any(char::is_control) {
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

/// Serves a request under `/api/v1/`.
pub fn handle(app: &App, reader: &mut Reader, req: Request, reply: Reply) {
    let grants = match app.authenticate(reader, &req) {
        Ok(grants) => grants,
        Err(failure) => return reply(failure.answer(Response::message)),
    };
    let response = match (route(&req.path), &req.method) {
        (None, _) => Response::message(404, "Not Found"),
        (Some(Route::Events(stream)), Method::Post) => {
            return append(app, &grants, stream, &req, reply);
        }
        (Some(Route::Events(stream)), Method::Get) => {
            return consume(app, reader, &grants, stream, &req, reply);
        }
        (Some(Route::Event(stream, id)), Method::Post) => {
            return ack(app, &grants, stream, id, &req, reply);
        }
        (Some(_), _) => Response::message(405, "Method Not Allowed"),
    };
    reply(response)
}

/// The top-level members the seed document defines, kept verbatim.
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

/// The request's body, or the answer for one over the limit or cut short.
fn body<'r>(app: &App, req: &'r Request) -> Result<&'r [u8], Response> {
    match &req.body {
        Body::TooLarge => Err(failure(
            413,
            &format!("limit is {} bytes", app.config.max_body),
        )),
        Body::Unreadable => Err(bad_request(UNREADABLE)),
        Body::Bytes(body) => Ok(body),
    }
}

fn append(app: &App, grants: &Grants, raw_stream: &str, req: &Request, reply: Reply) {
    let body = match body(app, req) {
        Ok(body) => body,
        Err(response) => return reply(response),
    };
    let checked = stream_name(raw_stream).and_then(|stream| {
        let producer = client_id(req, "X-Producer-ID")?;
        let (name, fields) = validate_event(body)?;
        Ok((stream, producer, name, fields))
    });
    let (stream, producer, name, fields) = match checked {
        Ok(checked) => checked,
        Err(why) => return reply(bad_request(&why)),
    };
    if !grants.may_produce(&stream) {
        return reply(forbidden());
    }
    let job = Job::Append {
        stream,
        producer: Some(producer),
        payload: Payload::Element { name, fields },
        done: Box::new(move |result: Result<Arc<Event>, WriteError>| {
            reply(match result {
                Ok(event) => Response::message(200, &event.id.to_string()),
                Err(WriteError::Locked) => {
                    Response::message(423, "Locked - Second writers not allowed")
                }
                Err(WriteError::Busy) => failure(503, "the write queue is full"),
                Err(e) => failure(500, super::storage_reason(&e)),
            })
        }),
    };
    if let Err(job) = app.submit(job) {
        super::refuse_busy(job);
    }
}

fn consume(
    app: &App,
    reader: &mut Reader,
    grants: &Grants,
    raw_stream: &str,
    req: &Request,
    reply: Reply,
) {
    let max = app.config.max_limit;
    let max_timeout = app.config.longpoll_max_timeout;
    let checked = (|| -> Result<_, String> {
        let stream = stream_name(raw_stream)?;
        let form = Form::parse(&req.query);
        if form.malformed {
            return Err("query string is not valid percent-encoded UTF-8".to_owned());
        }
        let name = match form.single("eventName")? {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => return Err("missing or empty 'eventName' parameter".into()),
        };
        let limit = form
            .single("limit")?
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| (1..=max).contains(l))
            .ok_or(format!("'limit' must be an integer from 1 to {max}"))?;
        let timeout = match form.single("timeout")? {
            None => None,
            Some(t) => Some(
                t.parse::<u64>()
                    .ok()
                    .filter(|t| (1..=max_timeout).contains(t))
                    .ok_or(format!(
                        "'timeout' must be an integer from 1 to {max_timeout}"
                    ))?,
            ),
        };
        let consumer = client_id(req, "X-Consumer-ID")?;
        Ok((stream, name, limit, timeout, consumer))
    })();
    let (stream, name, limit, timeout, consumer) = match checked {
        Ok(checked) => checked,
        Err(why) => return reply(bad_request(&why)),
    };
    if !grants.may_consume(&stream) {
        return reply(forbidden());
    }
    let view = match reader.consume(&stream, &consumer, &name, limit) {
        Ok(Some(view)) => view,
        Ok(None) => {
            let why = format!("stream {stream} does not exist");
            return reply(failure(404, &why));
        }
        Err(e) => {
            crate::log::error(&format!("consume read failed: {e}"));
            return reply(failure(500, "could not read the stream"));
        }
    };
    match timeout {
        Some(secs) if view.events.is_empty() => {
            let want = Want {
                start: Start::After(view.hwm),
                filter: Some(name),
                limit,
                timeout: Duration::from_secs(secs),
            };
            let parked = Parked {
                reply,
                kind: ParkedKind::Consumer,
                peer: req.remote,
            };
            app.wait(reader, &stream, want, parked);
        }
        _ => reply(elements_response(view.events.iter().map(String::as_str))),
    }
}

fn ack(app: &App, grants: &Grants, raw_stream: &str, raw_id: &str, req: &Request, reply: Reply) {
    let body = match body(app, req) {
        Ok(body) => body,
        Err(response) => return reply(response),
    };
    let checked = (|| -> Result<_, String> {
        let stream = stream_name(raw_stream)?;
        let id = decode(raw_id, false)
            .and_then(|id| Uuid::parse_str(&id).ok())
            .ok_or_else(|| "event id is not a UUID".to_owned())?;
        let consumer = client_id(req, "X-Consumer-ID")?;
        let body = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_owned())?;
        let form = Form::parse(body.trim());
        match form.single("action")? {
            Some("ACK") => Ok((stream, id, consumer)),
            Some(_) => Err("unknown 'action'; only action=ACK is supported".into()),
            None => Err("missing 'action=ACK' in the body".into()),
        }
    })();
    let (stream, id, consumer) = match checked {
        Ok(checked) => checked,
        Err(why) => return reply(bad_request(&why)),
    };
    if !grants.may_consume(&stream) {
        return reply(forbidden());
    }
    let job = Job::Ack {
        stream,
        consumer,
        id,
        done: Box::new(move |result| {
            reply(match result {
                Ok(()) => Response::message(200, "OK"),
                Err(WriteError::NotFound) => Response::message(404, "Not Found"),
                Err(WriteError::Busy) => failure(503, "the write queue is full"),
                Err(e) => failure(500, super::storage_reason(&e)),
            })
        }),
    };
    if let Err(job) = app.submit(job) {
        super::refuse_busy(job);
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
