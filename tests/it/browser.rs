//! Browsers: CORS for pages on other origins (`--cors-origins`), and no login dialog for
//! a script refused for its credentials. In a real headless Chromium, a page served from
//! another origin follows a category by long-poll (fetch) and by `EventSource` and
//! publishes to it: every event arrives once with the origin listed, and the browser
//! blocks all of it without.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Req, Resp, TestServer, publish_ok, send_within};

const ORIGIN: &str = "https://app.example";
const OTHER: &str = "https://evil.example";

/// Every path of both APIs, and the health check and metrics beside them.
const API_PATHS: [&str; 6] = [
    "/events?category=news&timeout=30",
    "/publish",
    "/api/v1/streams/news/events?eventName=E&limit=1",
    "/api/v1/streams/news/events/00000000-0000-0000-0000-000000000000",
    "/healthz",
    "/metrics",
];

/// A server allowing `origins`, where anyone may subscribe to any category (so a poll
/// would park at once).
fn server(origins: &[&str]) -> TestServer {
    let origins: Vec<String> = origins.iter().map(|o| o.to_string()).collect();
    TestServer::start_with(|c| {
        c.cors_origins = origins;
        c.public_subscribe = vec!["*".into()];
    })
}

/// The preflight a browser sends before a credentialed POST with a JSON body.
fn preflight(server: &TestServer, path: &str, origin: &str) -> Resp {
    let req = server
        .anon("OPTIONS", path)
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,x-producer-id",
        );
    let started = Instant::now();
    let resp = send_within(server.addr, &req, Duration::from_secs(10));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the preflight of {path} waited {:?}",
        started.elapsed()
    );
    resp
}

/// The names of `resp`'s CORS headers.
fn cors_headers(resp: &Resp) -> Vec<String> {
    resp.headers
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .filter(|name| name.starts_with("access-control-"))
        .collect()
}

/// Asserts that `resp` allows the listed `origin`, with credentials.
#[track_caller]
fn expect_allowed(resp: &Resp, origin: &str) {
    assert_eq!(resp.header("Access-Control-Allow-Origin"), Some(origin));
    assert_eq!(
        resp.header("Access-Control-Allow-Credentials"),
        Some("true")
    );
    assert_eq!(resp.header("Vary"), Some("Origin"));
    let exposed = resp.header("Access-Control-Expose-Headers").unwrap_or("");
    assert!(exposed.contains("Retry-After"), "exposed: {exposed:?}");
}

#[test]
fn a_preflight_from_a_listed_origin_is_answered_at_once_without_credentials() {
    let server = server(&[OTHER, ORIGIN]);
    for path in API_PATHS {
        let resp = preflight(&server, path, ORIGIN);
        assert_eq!(resp.status, 204, "{path}: {}", resp.text());
        expect_allowed(&resp, ORIGIN);
        let methods = resp.header("Access-Control-Allow-Methods").unwrap_or("");
        assert!(
            methods.contains("GET") && methods.contains("POST"),
            "{methods}"
        );
        let headers = resp.header("Access-Control-Allow-Headers").unwrap_or("");
        for needed in [
            "Authorization",
            "Content-Type",
            "X-Producer-ID",
            "X-Consumer-ID",
            "Last-Event-ID",
        ] {
            assert!(headers.contains(needed), "{path}: {needed} in {headers:?}");
        }
        let max_age: u64 = resp
            .header("Access-Control-Max-Age")
            .unwrap()
            .parse()
            .unwrap();
        assert!(max_age > 0);
    }
    assert_eq!(server.handle().parked(), 0, "no preflight was parked");
}

#[test]
fn a_preflight_from_another_origin_gets_no_allow_headers() {
    let server = server(&[ORIGIN]);
    for path in API_PATHS {
        let resp = preflight(&server, path, OTHER);
        assert_eq!(resp.status, 204, "{path}: {}", resp.text());
        assert_eq!(cors_headers(&resp), Vec::<String>::new(), "{path}");
    }
}

#[test]
fn answers_to_a_listed_origin_allow_it_and_vary_by_origin() {
    let server = server(&[ORIGIN]);
    let publish = server
        .req("POST", "/publish")
        .header("Origin", ORIGIN)
        .json(&json!({"category": "news", "data": 1}))
        .send();
    assert_eq!(publish.status, 200, "{}", publish.text());
    expect_allowed(&publish, ORIGIN);
    let poll = server
        .req("GET", "/events?category=news&timeout=5&since_time=0")
        .header("Origin", ORIGIN)
        .send();
    assert_eq!(poll.json()["events"][0]["data"], 1);
    expect_allowed(&poll, ORIGIN);
    let append = server
        .req("POST", "/api/v1/streams/s/events")
        .header("Origin", ORIGIN)
        .header("X-Producer-ID", "p")
        .json(&json!({"event": {"name": "E"}}))
        .send();
    assert_eq!(append.status, 200, "{}", append.text());
    expect_allowed(&append, ORIGIN);
    // A refusal too, so that the script can read why.
    let refused = server
        .anon("GET", "/api/v1/streams/s/events?eventName=E&limit=1")
        .header("Origin", ORIGIN)
        .send();
    assert_eq!(refused.status, 401);
    expect_allowed(&refused, ORIGIN);

    let other = server
        .req("GET", "/events?category=news&timeout=5&since_time=0")
        .header("Origin", OTHER)
        .send();
    assert_eq!(other.json()["events"][0]["data"], 1);
    assert_eq!(cors_headers(&other), Vec::<String>::new());
    assert_eq!(other.header("Vary"), Some("Origin"));
}

#[test]
fn with_a_wildcard_any_origin_is_allowed_without_credentials() {
    let server = server(&["*"]);
    publish_ok(&server, "news", &json!(1));
    let poll = server
        .anon("GET", "/events?category=news&timeout=5&since_time=0")
        .header("Origin", OTHER)
        .send();
    assert_eq!(poll.json()["events"][0]["data"], 1);
    assert_eq!(poll.header("Access-Control-Allow-Origin"), Some("*"));
    assert_eq!(poll.header("Access-Control-Allow-Credentials"), None);
    let resp = preflight(&server, "/publish", OTHER);
    assert_eq!(resp.status, 204);
    assert_eq!(resp.header("Access-Control-Allow-Origin"), Some("*"));
    assert_eq!(resp.header("Access-Control-Allow-Credentials"), None);
    assert!(resp.header("Access-Control-Allow-Headers").is_some());
}

#[test]
fn without_cors_origins_answers_carry_no_cors_headers() {
    let server = server(&[]);
    publish_ok(&server, "news", &json!(1));
    let poll = server
        .req("GET", "/events?category=news&timeout=5&since_time=0")
        .header("Origin", ORIGIN)
        .send();
    assert_eq!(poll.json()["events"][0]["data"], 1);
    assert_eq!(cors_headers(&poll), Vec::<String>::new());
    assert_eq!(poll.header("Vary"), None);
    for path in API_PATHS {
        let resp = preflight(&server, path, ORIGIN);
        assert_eq!(resp.status, 204, "{path}: {}", resp.text());
        assert_eq!(cors_headers(&resp), Vec::<String>::new(), "{path}");
    }
}

/// A preflight on a public category was taken for a poll and held until its timeout; on a
/// path that needs credentials it answered 401, so the browser never sent the request.
#[test]
fn a_preflight_is_neither_parked_as_a_poll_nor_refused_for_credentials() {
    let server = server(&[ORIGIN]);
    let parked = preflight(&server, "/events?category=news&timeout=30", ORIGIN);
    assert_eq!(parked.status, 204);
    let refused = preflight(&server, "/publish", ORIGIN);
    assert_eq!(refused.status, 204);
    assert_eq!(server.handle().parked(), 0);
}

/// The markers browsers put on a script's request: fetch and EventSource (`Sec-Fetch-Mode`
/// `cors` across origins, `same-origin` or `no-cors` otherwise), and XHR wrappers.
const SCRIPT_MARKERS: [(&str, &str); 4] = [
    ("Sec-Fetch-Mode", "cors"),
    ("Sec-Fetch-Mode", "same-origin"),
    ("Sec-Fetch-Mode", "no-cors"),
    ("X-Requested-With", "XMLHttpRequest"),
];

/// Requests that need credentials, on each API.
fn needing_credentials(server: &TestServer) -> [Req; 4] {
    [
        server.anon("GET", "/api/v1/streams/s/events?eventName=E&limit=1"),
        server.anon("GET", "/events?category=c&timeout=1"),
        server
            .anon("POST", "/publish")
            .json(&json!({"category": "c", "data": 1})),
        server.anon("GET", "/metrics"),
    ]
}

#[test]
fn a_script_refused_for_its_credentials_gets_no_login_challenge() {
    let server = TestServer::start();
    for base in needing_credentials(&server) {
        let wrong = base.clone().auth(crate::support::USER, "stale password");
        for req in [base, wrong] {
            let plain = req.send();
            assert_eq!(plain.status, 401);
            for (name, value) in SCRIPT_MARKERS {
                let script = req.clone().header(name, value).send();
                assert_eq!(script.status, 401, "{name}: {value}");
                assert_eq!(script.body, plain.body, "{name}: {value}: the same answer");
                assert_eq!(script.header("WWW-Authenticate"), None, "{name}: {value}");
            }
        }
    }
}

#[test]
fn navigations_and_other_clients_keep_the_login_challenge() {
    let server = TestServer::start();
    let challenge = Some("Basic realm=\"eventserver\"");
    for req in needing_credentials(&server) {
        assert_eq!(req.clone().send().header("WWW-Authenticate"), challenge);
        let opened = req.header("Sec-Fetch-Mode", "navigate").send();
        assert_eq!(opened.status, 401);
        assert_eq!(opened.header("WWW-Authenticate"), challenge);
    }
}

/// Scripts on a page of the server's own origin, refused for missing or wrong credentials:
/// fetch (a long-poll, a publish, a streams-API read), XHR and EventSource.
const REFUSED_SCRIPTS: &str = r#"Promise.all([
    fetch('/events?category=c&timeout=1').then(r => r.status),
    fetch('/publish', {method: 'POST', body: '{"category": "c", "data": 1}'}).then(r => r.status),
    fetch('/api/v1/streams/s/events?eventName=E&limit=1',
          {headers: {Authorization: 'Basic ' + btoa('tester:stale password')}}).then(r => r.status),
    new Promise(done => {
        const xhr = new XMLHttpRequest();
        xhr.open('GET', '/metrics');
        xhr.onloadend = () => done(xhr.status);
        xhr.send();
    }),
    new Promise(done => {
        const source = new EventSource('/events?category=c&timeout=1');
        source.onerror = () => { source.close(); done('refused'); };
    }),
])"#;

/// Each refused poll and publish of a page's script made the browser show its login dialog
/// (12 prompts in 6 s), because every 401 carried `WWW-Authenticate: Basic`.
#[test]
fn chromium_shows_no_login_dialog_for_a_scripts_refused_requests() {
    let Some(mut chromium) = crate::support::Chromium::start_or_skip() else {
        return;
    };
    let server = TestServer::start();
    let base = format!("http://{}", server.addr);
    chromium.navigate(&format!("{base}/healthz"));
    let statuses = chromium.evaluate(REFUSED_SCRIPTS);
    assert_eq!(statuses, json!([401, 401, 401, 401, "refused"]));
    assert_eq!(chromium.challenges, Vec::<String>::new(), "login dialogs");
    // The same refusal opened in the tab still asks for credentials: the browser would
    // show its dialog, which is what a person opening the URL needs.
    chromium.navigate(&format!("{base}/metrics"));
    assert_eq!(chromium.challenges, [format!("{base}/metrics")]);
}

/// A page on another origin streams a category with `EventSource` and publishes to it with
/// `fetch`: every event arrives once and in order, across the reconnection that the
/// stream's lifetime forces (with `Last-Event-ID`).
const EVENT_SOURCE_PAGE: &str = r#"
new Promise(done => {
    const headers = {
        'Authorization': 'Basic ' + btoa('tester:correct horse'),
        'Content-Type': 'application/json',
    };
    const publish = n => fetch(BASE + '/publish', {
        method: 'POST', headers, body: JSON.stringify({category: 'paged', data: {n}}),
    }).then(r => r.status);
    const got = [];
    let opens = 0;
    const source = new EventSource(BASE + '/events?category=paged');
    source.onopen = async () => {
        opens += 1;
        if (opens <= 2) {
            await publish(2 * opens - 2);
            await publish(2 * opens - 1);
        }
    };
    source.onmessage = e => {
        got.push([e.lastEventId, JSON.parse(e.data).id, JSON.parse(e.data).data.n]);
        if (got.length === 4) { source.close(); done({got, opens}); }
    };
    setTimeout(() => { source.close(); done({got, opens, late: true}); }, 20000);
})"#;

#[test]
fn an_event_source_on_another_origin_gets_every_event_once() {
    let Some(mut chromium) = crate::support::Chromium::start_or_skip() else {
        return;
    };
    let page = TestServer::start();
    let page_origin = format!("http://{}", page.addr);
    let server = TestServer::start_with(|c| {
        c.cors_origins = vec![page_origin.clone()];
        c.public_subscribe = vec!["paged".into()];
        c.sse_lifetime = Duration::from_secs(2);
    });
    chromium.navigate(&format!("{page_origin}/healthz"));
    let script = format!("const BASE = 'http://{}';{EVENT_SOURCE_PAGE}", server.addr);
    let result = chromium.evaluate(&script);
    assert!(result["late"].is_null(), "{result}");
    assert_eq!(result["opens"], 2, "one reconnection: {result}");
    let got = result["got"].as_array().expect("events");
    let numbers: Vec<u64> = got.iter().map(|e| e[2].as_u64().unwrap()).collect();
    assert_eq!(numbers, [0, 1, 2, 3], "{result}");
    assert!(
        got.iter().all(|e| e[0] == e[1]),
        "lastEventId is the event id: {result}"
    );
}

/// How many events the cross-origin page publishes.
const PUBLISHED: usize = 6;

/// How long a page may take to show what a test waits for.
const PATIENCE: Duration = Duration::from_secs(10);

/// What a page on another origin runs to follow category `feed` both ways at once:
/// golongpoll's long-poll by fetch (`since_time` and `last_id` from the last event seen,
/// with credentials, so every poll is preflighted) and an `EventSource`. What each gets
/// goes to `window.got`, what the browser refuses to `window.failures`.
const SUBSCRIBING_PAGE: &str = r#"
window.got = {poll: [], stream: []};
window.failures = [];
window.auth = {'Authorization': 'Basic ' + btoa('tester:correct horse')};
(async () => {
    let since = 1, last = null;
    while (window.got.poll.length < PUBLISHED) {
        const url = BASE + '/events?category=feed&timeout=5&since_time=' + since
            + (last ? '&last_id=' + last : '');
        let answer;
        try {
            answer = await (await fetch(url, {headers: window.auth})).json();
        } catch (e) {
            window.failures.push('poll: ' + e.name);
            return;
        }
        for (const event of answer.events || []) {
            window.got.poll.push([event.id, event.data.n]);
            since = event.timestamp;
            last = event.id;
        }
    }
})();
const source = new EventSource(BASE + '/events?category=feed');
source.onmessage = e => window.got.stream.push([e.lastEventId, JSON.parse(e.data).data.n]);
source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) window.failures.push('stream: closed');
};
"#;

/// The page's publishes to `feed`, one after another: each one's status, or the name of
/// the error its fetch was rejected with.
const PUBLISHING_PAGE: &str = r#"(async () => {
    const outcomes = [];
    for (let n = 0; n < PUBLISHED; n++) {
        const headers = {...window.auth, 'Content-Type': 'application/json'};
        const body = JSON.stringify({category: 'feed', data: {n}});
        try {
            outcomes.push((await fetch(BASE + '/publish', {method: 'POST', headers, body})).status);
        } catch (e) {
            outcomes.push(e.name);
        }
    }
    return outcomes;
})()"#;

/// A browser with a page open on one server's origin that follows `feed` on another server
/// ([`SUBSCRIBING_PAGE`]), which allows the page's origin when `cors` is set. `feed` is
/// public to subscribe to, so that an `EventSource` (which sends no `Authorization`) may
/// follow it.
fn subscribed_from_another_origin(cors: bool) -> Option<(crate::support::Chromium, TestServer)> {
    let mut chromium = crate::support::Chromium::start_or_skip()?;
    let page = TestServer::start();
    let page_origin = format!("http://{}", page.addr);
    let server = TestServer::start_with(|c| {
        if cors {
            c.cors_origins = vec![page_origin.clone()];
        }
        c.public_subscribe = vec!["feed".into()];
    });
    chromium.navigate(&format!("{page_origin}/healthz"));
    chromium.evaluate(&format!(
        "window.BASE = 'http://{}'; window.PUBLISHED = {PUBLISHED};",
        server.addr
    ));
    chromium.evaluate(SUBSCRIBING_PAGE);
    Some((chromium, server))
}

#[test]
fn a_page_on_a_listed_origin_long_polls_and_streams_every_event_once() {
    let Some((mut chromium, server)) = subscribed_from_another_origin(true) else {
        return;
    };
    // Publishing starts once both the poll and the stream wait on the server, so that the
    // stream (which starts at the newest event) misses none.
    chromium.wait_until(PATIENCE, "a parked poll and stream", |_| {
        server.handle().parked() == 2
    });
    let outcomes = chromium.evaluate(PUBLISHING_PAGE);
    assert_eq!(outcomes, json!(vec![200; PUBLISHED]));
    let all =
        format!("window.got.poll.length >= {PUBLISHED} && window.got.stream.length >= {PUBLISHED}");
    chromium.wait_for(PATIENCE, &all);
    let got = chromium.evaluate("window.got");
    // Each way's [id, n] pairs, by column.
    let column = |way: &str, i: usize| -> Vec<Value> {
        let events = got[way].as_array().expect("events");
        events.iter().map(|e| e[i].clone()).collect()
    };
    let expected: Vec<Value> = (0..PUBLISHED).map(|n| json!(n)).collect();
    assert_eq!(column("poll", 1), expected, "once and in order: {got}");
    assert_eq!(column("stream", 1), expected, "once and in order: {got}");
    assert_eq!(
        column("poll", 0),
        column("stream", 0),
        "the same ids: {got}"
    );
    assert_eq!(chromium.evaluate("window.failures"), json!([]));
    assert_eq!(chromium.challenges, Vec::<String>::new(), "login dialogs");
}

#[test]
fn without_cors_origins_the_browser_blocks_a_page_on_another_origin() {
    let Some((mut chromium, server)) = subscribed_from_another_origin(false) else {
        return;
    };
    chromium.wait_for(PATIENCE, "window.failures.length === 2");
    let mut failures = chromium.evaluate("window.failures");
    failures
        .as_array_mut()
        .unwrap()
        .sort_by_key(|f| f.to_string());
    assert_eq!(failures, json!(["poll: TypeError", "stream: closed"]));
    let outcomes = chromium.evaluate(PUBLISHING_PAGE);
    assert_eq!(outcomes, json!(vec!["TypeError"; PUBLISHED]));
    assert_eq!(
        chromium.evaluate("window.got"),
        json!({"poll": [], "stream": []})
    );
    // The browser never sent the publishes: their preflights were not allowed.
    let poll = crate::support::subscribe_req(&server, "category=feed&timeout=1&since_time=1");
    let answer = poll.send().json();
    assert!(answer["timeout"].is_string(), "{answer}");
}
