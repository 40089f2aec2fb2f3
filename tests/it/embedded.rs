//! The in-process API an embedding program uses (`ServerHandle::publish` and `subscribe`,
//! the way Go programs use golongpoll's manager): the same checks and answers as the HTTP
//! API, with typed results and the API's own failures.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventserver::{Error, Failure, Polled, Start};
use serde_json::json;

use crate::support::{TestServer, append_ok, event, publish_ok, wait_until};

const SECOND: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    since.as_millis() as u64
}

fn from_start() -> Start {
    Start::Since {
        ms: 0,
        last_id: None,
    }
}

#[test]
fn an_in_process_subscribe_times_out_with_a_stamp_to_resume_from() {
    let server = TestServer::start();
    let before = now_ms();
    let polled = server
        .handle()
        .subscribe("quiet", from_start(), SECOND)
        .expect("subscribe");
    match polled {
        Polled::Timeout { timestamp } => assert!(timestamp >= before, "{timestamp} < {before}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn an_http_publish_wakes_an_in_process_subscriber() {
    let server = TestServer::start();
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let timeout = Duration::from_secs(20);
            server.handle().subscribe("news", from_start(), timeout)
        });
        wait_until(Duration::from_secs(10), "the subscriber is parked", || {
            server.handle().parked() == 1
        });
        publish_ok(&server, "news", &json!({"headline": "hello"}));
        match waiting.join().expect("subscriber thread") {
            Ok(Polled::Events(events)) => {
                assert_eq!(events.len(), 1, "{events:?}");
                assert_eq!(events[0].category, "news");
                assert_eq!(events[0].data, json!({"headline": "hello"}));
            }
            other => panic!("expected the event, got {other:?}"),
        }
    });
    assert_eq!(server.handle().parked(), 0);
}

#[test]
fn an_in_process_publish_obeys_the_single_writer_rule() {
    let server = TestServer::start();
    append_ok(&server, "owned", "producer-1", &event("Made"));
    let refused = server.handle().publish("owned", &json!(1));
    assert!(
        matches!(refused, Err(Error::Refused(Failure::Locked))),
        "{refused:?}"
    );
    server.handle().publish("free", &json!(1)).expect("unowned");
}

#[test]
fn in_process_calls_check_their_input_as_the_http_api_does() {
    let server = TestServer::start();
    let handle = server.handle();
    for timeout in [Duration::ZERO, Duration::from_secs(111)] {
        let refused = handle.subscribe("c", from_start(), timeout);
        assert!(
            matches!(refused, Err(Error::Refused(Failure::BadSubscription(_)))),
            "timeout {timeout:?}: {refused:?}"
        );
    }
    let refused = handle.subscribe("", from_start(), SECOND);
    assert!(
        matches!(refused, Err(Error::Refused(Failure::BadSubscription(_)))),
        "{refused:?}"
    );
    for (category, data) in [("", json!(1)), ("c", json!(null))] {
        let refused = handle.publish(category, &data);
        assert!(
            matches!(refused, Err(Error::Refused(Failure::BadRequest(_)))),
            "{category:?} {data}: {refused:?}"
        );
    }
}

#[test]
fn an_in_process_publish_after_shutdown_is_refused() {
    let server = TestServer::start();
    server.handle().shutdown();
    let refused = server.handle().publish("late", &json!(1));
    assert!(
        matches!(refused, Err(Error::Refused(Failure::Stopping))),
        "{refused:?}"
    );
}
