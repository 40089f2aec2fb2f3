//! Security: per-user grants (403), throttled login failures (429) counted fairly per
//! address and user, the client behind a trusted proxy, and no user enumeration by timing.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{PASSWORD, Req, TestServer, USER};

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

/// A server throttling loopback clients after `limit` failures, with a second user.
fn throttling_server(limit: u32) -> TestServer {
    let server = TestServer::start_with(|c| {
        c.auth_failure_limit = limit;
        c.auth_throttle_loopback = true;
    });
    eventserver::admin::add_user(&server.db, COLLEAGUE, COLLEAGUE_PW).expect("add colleague");
    server
}

const COLLEAGUE: &str = "colleague";
const COLLEAGUE_PW: &str = "colleague pw";

/// A request needing credentials, as `user`.
fn as_user(server: &TestServer, user: &str, password: &str) -> Req {
    Req::new(server.addr, "GET", "/metrics").auth(user, password)
}

/// After 3 failures of one user every user of the address got 429: one stale tab behind an
/// office's NAT locked the office out.
#[test]
fn one_users_failures_do_not_lock_out_the_other_users_of_its_address() {
    let server = throttling_server(3);
    for _ in 0..3 {
        assert_eq!(as_user(&server, USER, "stale").send().status, 401);
    }
    assert_eq!(as_user(&server, USER, "stale").send().status, 429);
    let guessed = as_user(&server, USER, PASSWORD).send();
    assert_eq!(
        guessed.status, 429,
        "guessing one user's password stays throttled"
    );
    let colleague = as_user(&server, COLLEAGUE, COLLEAGUE_PW).send();
    assert_eq!(colleague.status, 200, "{}", colleague.text());
    let sub = Req::new(
        server.addr,
        "GET",
        "/events?category=c&timeout=1&since_time=0",
    )
    .auth(COLLEAGUE, COLLEAGUE_PW)
    .send();
    assert_eq!(sub.status, 200, "{}", sub.text());
}

#[test]
fn spraying_user_names_from_one_address_is_throttled_but_known_users_pass() {
    let server = throttling_server(3);
    assert_eq!(as_user(&server, USER, PASSWORD).send().status, 200);
    for name in ["admin", "root", "test"] {
        assert_eq!(as_user(&server, name, "123456").send().status, 401);
    }
    let sprayed = as_user(&server, "guest", "123456").send();
    assert_eq!(sprayed.status, 429, "{}", sprayed.text());
    assert!(sprayed.header("Retry-After").is_some());
    // A user who never logged in from here waits too; one who did still passes.
    assert_eq!(as_user(&server, COLLEAGUE, COLLEAGUE_PW).send().status, 429);
    assert_eq!(as_user(&server, USER, PASSWORD).send().status, 200);
}

/// Behind a reverse proxy every client was the proxy: on loopback the throttle was off, and
/// `X-Forwarded-For` was never believed.
#[test]
fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let server = TestServer::start_with(|c| {
        c.auth_failure_limit = 2;
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    });
    let from = |chain: &str, password: &str| {
        as_user(&server, USER, password)
            .header("X-Forwarded-For", chain)
            .send()
            .status
    };
    assert_eq!(from("203.0.113.7", "wrong"), 401);
    assert_eq!(from("203.0.113.7", "wrong"), 401);
    assert_eq!(
        from("203.0.113.7", "wrong"),
        429,
        "the client behind the proxy"
    );
    // What the client wrote left of the address the proxy saw does not change who it is.
    assert_eq!(from("192.0.2.1, 203.0.113.7", "wrong"), 429);
    assert_eq!(from("203.0.113.8", PASSWORD), 200, "another client");

    let untrusted = TestServer::start_with(|c| c.auth_failure_limit = 2);
    for _ in 0..4 {
        let resp = as_user(&untrusted, USER, "wrong")
            .header("X-Forwarded-For", "203.0.113.7")
            .send();
        assert_eq!(resp.status, 401, "a loopback peer, whatever it forwards");
    }
}

#[test]
fn the_log_names_the_client_behind_a_trusted_proxy() {
    let (_dir, db) = crate::support::db_with_user();
    let (mut proc, addr) =
        crate::support::serve(&db, &["--trusted-proxies", "127.0.0.0/8,10.0.0.0/8"], &[]);
    let resp = crate::support::authed(addr, "GET", "/events?category=c&timeout=1&since_time=0")
        .header("X-Forwarded-For", "203.0.113.9, 10.1.2.3")
        .send();
    assert_eq!(resp.status, 200);
    proc.wait_stderr("user=tester client=203.0.113.9", Duration::from_secs(10));
    proc.stop();
}
