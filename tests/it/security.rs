//! Security: per-user grants (403), throttled login failures (429), and no user
//! enumeration by timing.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Req, TestServer};

const LIMITED: &str = "limited";
const LIMITED_PW: &str = "limited pw";

/// A server with a user who may produce only to `orders*` and consume only `orders-a`.
fn server_with_limited_user() -> TestServer {
    let server = TestServer::start();
    eventserver::admin::add_user_with(&server.db, LIMITED, LIMITED_PW, "orders*", "orders-a")
        .expect("add limited user");
    server
}

fn as_limited(server: &TestServer, method: &str, path: &str) -> Req {
    Req::new(server.addr, method, path).auth(LIMITED, LIMITED_PW)
}

fn event() -> serde_json::Value {
    json!({"event": {"name": "E"}})
}

#[test]
fn grants_limit_streams_api_producing_and_consuming() {
    let server = server_with_limited_user();
    let ok = as_limited(&server, "POST", "/api/v1/streams/orders-a/events")
        .header("X-Producer-ID", "p")
        .json(&event())
        .send();
    assert_eq!(ok.status, 200, "{}", ok.text());
    let id: String = serde_json::from_slice(&ok.body).unwrap();

    let denied = as_limited(&server, "POST", "/api/v1/streams/news/events")
        .header("X-Producer-ID", "p")
        .json(&event())
        .send();
    assert_eq!(denied.status, 403);
    assert_eq!(denied.text(), "\"Forbidden\"");
    assert_eq!(
        denied.header("Content-Type"),
        Some("application/json; charset=utf-8")
    );
    let nothing = server
        .req("GET", "/api/v1/streams/news/events?eventName=E&limit=1")
        .header("X-Consumer-ID", "c")
        .send();
    assert_eq!(nothing.status, 404, "a forbidden append stores nothing");

    let read = as_limited(
        &server,
        "GET",
        "/api/v1/streams/orders-a/events?eventName=E&limit=5",
    )
    .header("X-Consumer-ID", "c")
    .send();
    assert_eq!(read.status, 200);
    assert_eq!(read.json()[0]["eventId"], id.as_str());
    let ack = as_limited(
        &server,
        "POST",
        &format!("/api/v1/streams/orders-a/events/{id}"),
    )
    .header("X-Consumer-ID", "c")
    .body("action=ACK")
    .send();
    assert_eq!(ack.status, 200);

    let other = server
        .req("POST", "/api/v1/streams/orders-b/events")
        .header("X-Producer-ID", "p")
        .json(&event())
        .send();
    assert_eq!(other.status, 200);
    let read = as_limited(
        &server,
        "GET",
        "/api/v1/streams/orders-b/events?eventName=E&limit=5",
    )
    .header("X-Consumer-ID", "c")
    .send();
    assert_eq!((read.status, read.text().as_str()), (403, "\"Forbidden\""));
}

#[test]
fn grants_limit_long_poll_publish_and_subscribe() {
    let server = server_with_limited_user();
    let publish = |category: &str| {
        as_limited(&server, "POST", "/publish")
            .json(&json!({"category": category, "data": 1}))
            .send()
    };
    assert_eq!(publish("orders-a").status, 200);
    let denied = publish("news");
    assert_eq!(denied.status, 403);
    assert_eq!(denied.text(), r#"{"error": "Forbidden"}"#);

    let sub = |category: &str| {
        as_limited(
            &server,
            "GET",
            &format!("/events?category={category}&timeout=1&since_time=0"),
        )
        .send()
    };
    let got = sub("orders-a");
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["events"][0]["data"], 1);
    let denied = sub("orders-b");
    assert_eq!(denied.status, 403);
    assert_eq!(denied.text(), r#"{"error": "Forbidden"}"#);
}

#[test]
fn repeated_login_failures_are_throttled() {
    let server = TestServer::start_with(|c| {
        c.auth_failure_limit = 3;
        c.auth_throttle_loopback = true;
    });
    let path = "/api/v1/streams/s/events?eventName=E&limit=1";
    for _ in 0..3 {
        let resp = Req::new(server.addr, "GET", path)
            .auth(crate::support::USER, "wrong")
            .header("X-Consumer-ID", "c")
            .send();
        assert_eq!(resp.status, 401);
    }
    let resp = Req::new(server.addr, "GET", path)
        .auth("nobody", "wrong")
        .header("X-Consumer-ID", "c")
        .send();
    assert_eq!(resp.status, 429, "{}", resp.text());
    let wait: u64 = resp
        .header("Retry-After")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait));
    assert!(
        resp.text().starts_with("\"Too Many Requests - "),
        "{}",
        resp.text()
    );
    let sub = Req::new(server.addr, "GET", "/events?category=c&timeout=1")
        .auth("nobody", "wrong")
        .send();
    assert_eq!(sub.status, 429);
    assert!(
        sub.text().starts_with(r#"{"error": "Too Many Requests - "#),
        "{}",
        sub.text()
    );
}

#[test]
fn loopback_clients_are_not_throttled_by_default() {
    let server = TestServer::start_with(|c| c.auth_failure_limit = 2);
    for _ in 0..4 {
        let resp = Req::new(server.addr, "GET", "/events?category=c&timeout=1")
            .auth("nobody", "wrong")
            .send();
        assert_eq!(resp.status, 401);
    }
}

#[test]
fn unknown_users_cost_as_much_as_wrong_passwords() {
    let server = TestServer::start();
    let time = |user: &str| {
        let started = Instant::now();
        for _ in 0..3 {
            let resp = Req::new(server.addr, "GET", "/events?category=c&timeout=1")
                .auth(user, "wrong password")
                .send();
            assert_eq!(resp.status, 401);
        }
        started.elapsed()
    };
    let wrong_password = time(crate::support::USER);
    let unknown_user = time("no-such-user");
    // Both run one argon2 verification per attempt (tens of milliseconds); skipping it for
    // unknown users would make them hundreds of times faster.
    assert!(
        unknown_user * 3 > wrong_password && wrong_password * 3 > unknown_user,
        "wrong password {wrong_password:?} vs unknown user {unknown_user:?}"
    );
    assert!(
        wrong_password > Duration::from_millis(3),
        "a verification takes real work"
    );
}
