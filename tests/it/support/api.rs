//! Requests of the two APIs, built the way every test sends them: the streams API
//! (append, read, ACK) and the long-poll API (publish, subscribe).

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::{Req, Resp, TestServer, authed};

/// The content type of every JSON answer.
pub const JSON_UTF8: &str = "application/json; charset=utf-8";

/// Where a request goes: an address, or a server started in process.
pub trait Target {
    /// The server's address.
    fn addr(&self) -> SocketAddr;
}

impl Target for SocketAddr {
    fn addr(&self) -> SocketAddr {
        *self
    }
}

/// Each request to a [`TestServer`] goes to its next node in turn.
impl Target for &TestServer {
    fn addr(&self) -> SocketAddr {
        self.next_addr()
    }
}

/// The events of `stream` (already encoded).
pub fn events_path(stream: &str) -> String {
    format!("/api/v1/streams/{stream}/events")
}

/// One event of `stream` (already encoded).
pub fn event_path(stream: &str, id: &str) -> String {
    format!("/api/v1/streams/{stream}/events/{id}")
}

/// A minimal valid event body.
pub fn event(name: &str) -> Value {
    json!({ "event": { "name": name } })
}

/// `producer`'s append of `body` to `stream`.
pub fn append_req(at: impl Target, stream: &str, producer: &str, body: &Value) -> Req {
    authed(at.addr(), "POST", &events_path(stream))
        .header("X-Producer-ID", producer)
        .json(body)
}

/// Appends and returns the new event id, asserting a 200 with a UUID as a JSON string.
#[track_caller]
pub fn append_ok(at: impl Target, stream: &str, producer: &str, body: &Value) -> String {
    let resp = append_req(at, stream, producer, body).send();
    assert_eq!(
        resp.status,
        200,
        "append to {stream} by {producer}: {}",
        resp.text()
    );
    expect_json_type(&resp);
    let id = resp
        .json()
        .as_str()
        .unwrap_or_else(|| panic!("append answer is not a JSON string: {}", resp.text()))
        .to_owned();
    uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("{id:?} is not a UUID: {e}"));
    id
}

/// `consumer`'s read of `stream` with `query` (already encoded).
pub fn consume_req(at: impl Target, stream: &str, consumer: &str, query: &str) -> Req {
    authed(
        at.addr(),
        "GET",
        &format!("{}?{query}", events_path(stream)),
    )
    .header("X-Consumer-ID", consumer)
}

/// `consumer`'s ACK of event `id` of `stream`.
pub fn ack_req(at: impl Target, stream: &str, id: &str, consumer: &str) -> Req {
    authed(at.addr(), "POST", &event_path(stream, id))
        .header("X-Consumer-ID", consumer)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("action=ACK")
}

/// A publish of `data` to `category`.
pub fn publish_req(at: impl Target, category: &str, data: &Value) -> Req {
    authed(at.addr(), "POST", "/publish").json(&json!({ "category": category, "data": data }))
}

/// Publishes and asserts golongpoll's success answer.
#[track_caller]
pub fn publish_ok(at: impl Target, category: &str, data: &Value) {
    let resp = publish_req(at, category, data).send();
    assert_eq!(resp.status, 200, "publish: {}", resp.text());
    assert_eq!(resp.text(), r#"{"success": true}"#);
}

/// A long-poll subscribe with `query` (already encoded).
pub fn subscribe_req(at: impl Target, query: &str) -> Req {
    authed(at.addr(), "GET", &format!("/events?{query}"))
}

/// Asserts the JSON content type.
#[track_caller]
pub fn expect_json_type(resp: &Resp) {
    assert_eq!(
        resp.header("Content-Type"),
        Some(JSON_UTF8),
        "Content-Type of a {} answer ({})",
        resp.status,
        resp.text()
    );
}

/// Asserts that the body is a JSON string starting with `prefix`.
#[track_caller]
pub fn expect_text_starting(resp: &Resp, prefix: &str) {
    assert!(
        resp.json().as_str().is_some_and(|t| t.starts_with(prefix)),
        "expected a JSON string starting {prefix:?}: {}",
        resp.text()
    );
}
