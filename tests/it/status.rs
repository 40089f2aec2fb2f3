//! The status page (`GET /`) and the overview it reads (`GET /api/v1/status`): behind the
//! APIs' credentials, names only where the user may read, lists bounded, and in a real
//! Chromium a page that shows the streams and tails one live.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    PASSWORD, Req, TestServer, USER, ack_req, append_ok, event, publish_ok, send_within,
    subscribe_req, wait_until,
};

const OVERVIEW: &str = "/api/v1/status";
const CHALLENGE: Option<&str> = Some("Basic realm=\"eventserver\"");

/// A user who may read only `news` and write nothing.
const READER: (&str, &str) = ("reader", "reader pw");
/// A user with no grants at all.
const NOBODY: (&str, &str) = ("nobody", "nobody pw");

/// `GET path` as `(user, password)`.
fn get_as(server: &TestServer, (user, password): (&str, &str), path: &str) -> Req {
    Req::new(server.addr, "GET", path).auth(user, password)
}

/// The overview, asserting a 200 JSON answer.
#[track_caller]
fn overview(req: Req) -> Value {
    let resp = req.send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    crate::support::expect_json_type(&resp);
    resp.json()
}

/// The names of the listed streams.
fn names(overview: &Value) -> Vec<String> {
    let streams = overview["streams"].as_array().expect("streams");
    streams
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_page_and_its_overview_need_the_apis_credentials() {
    let server = TestServer::start();
    for path in ["/", OVERVIEW] {
        let anonymous = server.anon("GET", path).send();
        assert_eq!(anonymous.status, 401, "{path}");
        assert_eq!(anonymous.text(), "\"Unauthorized\"", "{path}");
        assert_eq!(anonymous.header("WWW-Authenticate"), CHALLENGE, "{path}");
        // A person opening it in a tab gets the login dialog; the page's own script does
        // not.
        let opened = server
            .anon("GET", path)
            .header("Sec-Fetch-Mode", "navigate");
        assert_eq!(
            opened.send().header("WWW-Authenticate"),
            CHALLENGE,
            "{path}"
        );
        let script = server
            .anon("GET", path)
            .header("Sec-Fetch-Mode", "same-origin");
        let script = script.send();
        assert_eq!(script.status, 401, "{path}");
        assert_eq!(script.header("WWW-Authenticate"), None, "{path}");
        let wrong = server.anon("GET", path).auth(USER, "stale password").send();
        assert_eq!(wrong.status, 401, "{path}");
        let posted = server.req("POST", path).body("x").send();
        assert_eq!(posted.status, 405, "{path}: {}", posted.text());
    }
}

#[test]
fn the_page_is_one_self_contained_html_document() {
    let server = TestServer::start();
    let page = server.req("GET", "/").send();
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("Content-Type"),
        Some("text/html; charset=utf-8")
    );
    let policy = page.header("Content-Security-Policy").unwrap_or("");
    assert!(policy.starts_with("default-src 'none'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    let html = page.text();
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(html.contains("<style>") && html.contains("<script>"));
    for external in ["http://", "https://", " src=", "<link", "@import"] {
        assert!(!html.contains(external), "the page loads {external}");
    }
    // Names come from clients: the page sets them as text only.
    assert!(!html.contains("innerHTML"));
}

#[test]
fn the_overview_shows_streams_owners_consumers_lag_and_parked_polls() {
    let server = TestServer::start();
    let first = append_ok(&server, "orders", "billing", &event("OrderPlaced"));
    append_ok(&server, "orders", "billing", &event("OrderPlaced"));
    let acked = ack_req(&server, "orders", &first, "shipping").send();
    assert_eq!(acked.status, 200, "{}", acked.text());
    publish_ok(&server, "news", &json!({"headline": 1}));
    let addr = server.addr;
    let poll = std::thread::spawn(move || {
        let req = subscribe_req(addr, "category=news&timeout=30");
        send_within(addr, &req, Duration::from_secs(40))
    });
    wait_until(Duration::from_secs(5), "a parked poll", || {
        server.handle().parked() == 1
    });

    let seen = overview(server.req("GET", OVERVIEW));
    assert_eq!(seen["user"], USER);
    assert_eq!(seen["events_path"], "/events");
    assert_eq!(names(&seen), ["news", "orders"]);
    let orders = &seen["streams"][1];
    assert_eq!(orders["owner"], "billing");
    assert_eq!(orders["events"], 2);
    assert_eq!(orders["last_seq"], 2);
    assert!(orders["last_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        orders["consumers"],
        json!([{"consumer": "shipping", "event_name": "OrderPlaced", "offset": 1, "lag": 1}])
    );
    assert_eq!(seen["streams"][0]["events"], 1);
    assert_eq!(seen["more_streams"], false);
    assert_eq!(seen["more_consumers"], false);
    assert_eq!(seen["parked"]["total"], 1);
    assert_eq!(
        seen["parked"]["categories"],
        json!([{"category": "news", "parked": 1}])
    );
    assert!(seen["parked"]["max"].as_u64().unwrap() > 0);

    publish_ok(&server, "news", &json!({"headline": 2}));
    assert_eq!(
        poll.join().unwrap().json()["events"][0]["data"]["headline"],
        2
    );
}

#[test]
fn users_see_names_only_of_streams_they_may_read() {
    let server = TestServer::start_with(|c| c.public_subscribe = vec!["public-*".into()]);
    let (user, password) = READER;
    eventserver::admin::add_user_with(&server.db, user, password, "", "news").unwrap();
    let (user, password) = NOBODY;
    eventserver::admin::add_user_with(&server.db, user, password, "", "").unwrap();
    for stream in ["news", "orders", "public-notes"] {
        publish_ok(&server, stream, &json!(1));
    }
    let addr = server.addr;
    let polls: Vec<_> = ["news", "orders"]
        .into_iter()
        .map(|category| {
            std::thread::spawn(move || {
                let req = subscribe_req(addr, &format!("category={category}&timeout=30"));
                send_within(addr, &req, Duration::from_secs(40))
            })
        })
        .collect();
    wait_until(Duration::from_secs(5), "two parked polls", || {
        server.handle().parked() == 2
    });

    let all = overview(server.req("GET", OVERVIEW));
    assert_eq!(names(&all), ["news", "orders", "public-notes"]);
    let reader = overview(get_as(&server, READER, OVERVIEW));
    assert_eq!(reader["user"], READER.0);
    assert_eq!(names(&reader), ["news", "public-notes"]);
    assert_eq!(
        reader["parked"]["categories"],
        json!([{"category": "news", "parked": 1}])
    );
    // Counts over the whole server are shown to every user, as /metrics shows them.
    assert_eq!(reader["parked"]["total"], 2);

    let page = get_as(&server, NOBODY, "/").send();
    assert_eq!(page.status, 200, "the page itself needs no grant");
    let nobody = overview(get_as(&server, NOBODY, OVERVIEW));
    assert_eq!(names(&nobody), ["public-notes"]);
    assert_eq!(nobody["parked"]["categories"], json!([]));
    assert_eq!(nobody["parked"]["total"], 2);

    for category in ["news", "orders"] {
        publish_ok(&server, category, &json!(2));
    }
    for poll in polls {
        assert_eq!(poll.join().unwrap().json()["events"][0]["data"], 2);
    }
}

#[test]
fn the_overview_lists_at_most_100_streams_and_200_consumers_and_says_so() {
    let server = TestServer::start();
    let handle = server.handle();
    for n in 0..101 {
        handle.publish(&format!("s{n:03}"), &json!(n)).unwrap();
    }
    let id = append_ok(&server, "s000", "p", &event("E"));
    for n in 0..201 {
        let acked = ack_req(&server, "s000", &id, &format!("c{n:03}")).send();
        assert_eq!(acked.status, 200, "{}", acked.text());
    }
    let seen = overview(server.req("GET", OVERVIEW));
    let expected: Vec<String> = (0..100).map(|n| format!("s{n:03}")).collect();
    assert_eq!(names(&seen), expected);
    assert_eq!(seen["more_streams"], true);
    assert_eq!(
        seen["streams"][0]["consumers"].as_array().unwrap().len(),
        200
    );
    assert_eq!(seen["more_consumers"], true);
    assert_eq!(
        seen["limits"],
        json!({"streams": 100, "consumers": 200, "categories": 100})
    );
}

#[test]
fn where_the_long_poll_api_takes_the_root_it_keeps_it() {
    let server = TestServer::start_with(|c| c.events_path = "/".into());
    let resp = server.req("GET", "/").send();
    assert_eq!(resp.status, 200);
    assert!(resp.text().starts_with("{\"error\""), "{}", resp.text());
    assert_eq!(server.req("GET", OVERVIEW).send().status, 200);
}

/// What the page shows once it has loaded: the streams listed, and the tail's state.
const LISTED: &str = "document.querySelector('#streams tr[data-stream=\"orders\"]') !== null \
    && document.querySelector('#streams tr[data-stream=\"news\"]') !== null";

#[test]
fn chromium_shows_the_status_page_with_its_streams_and_a_live_tail() {
    let Some(mut chromium) = crate::support::Chromium::start_or_skip() else {
        return;
    };
    let server = TestServer::start();
    let first = append_ok(&server, "orders", "billing", &event("OrderPlaced"));
    append_ok(&server, "orders", "billing", &event("OrderPlaced"));
    append_ok(&server, "orders", "billing", &event("OrderShipped"));
    let acked = ack_req(&server, "orders", &first, "shipping").send();
    assert_eq!(acked.status, 200, "{}", acked.text());
    publish_ok(&server, "news", &json!({"headline": "warming up"}));

    let page = format!("http://{}/", server.addr);
    chromium.sign_in(USER, PASSWORD);
    chromium.navigate(&page);
    let within = Duration::from_secs(10);
    chromium.wait_for(within, LISTED);
    let lag = "document.querySelector('#consumers td.lag-high')?.textContent === '1'";
    chromium.wait_for(within, lag);

    // Tail `news` as a person would, by its button; the tail is live once its stream is
    // parked on the server.
    let tail = "document.querySelector('#streams tr[data-stream=\"news\"] button').click()";
    chromium.evaluate(tail);
    chromium.wait_for(
        within,
        "document.getElementById('tail-state').dataset.state === 'live'",
    );
    chromium.wait_until(within, "the tail parked", |_| server.handle().parked() == 1);
    publish_ok(&server, "news", &json!({"headline": "hello from the test"}));
    let shown = "[...document.querySelectorAll('#tail-events td')]\
        .some(td => td.textContent.includes('hello from the test'))";
    chromium.wait_for(within, shown);
    chromium.evaluate("refresh()");
    chromium.wait_for(
        within,
        "document.getElementById('parked-total').textContent === '1'",
    );

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    chromium.screenshot(&shot);
    eprintln!("the status page: {}", shot.display());
    // Only the page's own navigation asked for credentials: its overview and its tail used
    // the ones the browser cached.
    assert_eq!(chromium.challenges, [page]);
}
