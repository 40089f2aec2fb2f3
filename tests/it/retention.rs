//! Retention: at most N events per stream, or none older than an age, oldest deleted first,
//! sequence numbers kept; interest retention, which keeps what known consumers have not
//! acknowledged; and reads by time over a stream whose sequence has gaps.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    TestServer, ack_req, append_ok, consume_req, event, publish_ok, subscribe_req, wait_until,
};

/// Every `E` event of `stream` (at most 100) after consumer `c`'s offset.
fn elements(server: &TestServer, stream: &str) -> Vec<serde_json::Value> {
    let resp = consume_req(server, stream, "c", "eventName=E&limit=100").send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json().as_array().cloned().expect("an array")
}

#[test]
fn retain_events_keeps_the_newest_per_stream() {
    let mut server = TestServer::start();
    for stream in ["r1", "r2"] {
        for i in 0..10 {
            let body = serde_json::json!({"event": {"name": "E"}, "payload": i});
            append_ok(&server, stream, "p", &body);
        }
    }
    assert_eq!(elements(&server, "r1").len(), 10);
    server.restart_with(|c| c.retain_events = Some(3));
    for stream in ["r1", "r2"] {
        wait_until(Duration::from_secs(5), "retention to run", || {
            elements(&server, stream).len() == 3
        });
        let kept = elements(&server, stream);
        let seqs: Vec<u64> = kept
            .iter()
            .map(|e| e["sequence"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![8, 9, 10]);
        assert_eq!(kept[0]["payload"], 7);
    }
    append_ok(&server, "r1", "p", &event("E"));
    let last = elements(&server, "r1").last().cloned().unwrap();
    assert_eq!(
        last["sequence"], 11,
        "sequence numbers continue after retention"
    );
}

/// Deletes events of `stream` by sequence number behind the server's back, as an operator's
/// `DELETE` would.
fn delete_events(db: &Path, stream: &str, seqs: &[u64]) {
    let conn = rusqlite::Connection::open(db).expect("open the database");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    for seq in seqs {
        let deleted = conn
            .execute(
                "DELETE FROM events WHERE seq = ?1 \
                 AND stream_id = (SELECT id FROM streams WHERE name = ?2)",
                rusqlite::params![*seq as i64, stream],
            )
            .expect("delete an event");
        assert_eq!(deleted, 1, "event {seq} of {stream}");
    }
}

/// The long-poll answer's events for `query` (already encoded).
fn polled(server: &TestServer, query: &str) -> Vec<Value> {
    let resp = subscribe_req(server, &format!("timeout=1&{query}")).send();
    assert_eq!(resp.status, 200, "{query}: {}", resp.text());
    let events = resp.json()["events"].as_array().cloned();
    events.unwrap_or_else(|| panic!("{query}: no events in {}", resp.text()))
}

#[test]
fn since_time_is_exact_over_a_stream_with_gaps() {
    let mut server = TestServer::start();
    for n in 1..=12 {
        publish_ok(&server, "gappy", &json!(n));
    }
    let all = polled(&server, "category=gappy&since_time=0");
    assert_eq!(all.len(), 12);
    // Data n is sequence number n; the middle ones are where a binary search looks first.
    let deleted = [2, 6, 7, 11];
    delete_events(&server.db, "gappy", &deleted);
    // A fresh server holds no recent events in memory: every read is resolved on disk.
    server.restart();
    let (gone, kept): (Vec<Value>, Vec<Value>) = all
        .into_iter()
        .partition(|e| deleted.contains(&e["data"].as_u64().unwrap()));
    let ts = |e: &Value| e["timestamp"].as_u64().unwrap();
    let data = |events: &[Value]| -> Vec<u64> {
        events.iter().map(|e| e["data"].as_u64().unwrap()).collect()
    };
    let newest = ts(kept.last().unwrap());
    for since in kept.iter().chain(&gone).map(ts).chain([0, 1]) {
        if since >= newest {
            continue; // nothing after it: the poll would wait for its timeout
        }
        let after: Vec<Value> = kept.iter().filter(|e| ts(e) > since).cloned().collect();
        let query = format!("category=gappy&since_time={since}");
        assert_eq!(data(&polled(&server, &query)), data(&after), "{query}");
    }
    // Resuming from a deleted event: its id is not found, so everything stored at or after
    // its time comes back.
    for e in &gone {
        let at: Vec<Value> = kept.iter().filter(|k| ts(k) >= ts(e)).cloned().collect();
        let query = format!(
            "category=gappy&since_time={}&last_id={}",
            ts(e),
            e["id"].as_str().unwrap()
        );
        assert_eq!(data(&polled(&server, &query)), data(&at), "{query}");
    }
}

#[test]
fn retention_by_age_trims_across_a_gap() {
    let mut server = TestServer::start();
    for n in 1..=10 {
        publish_ok(&server, "aged", &json!(n));
    }
    // Events 1-6 are made an hour old (timestamps still never decrease along the stream),
    // and the sequence gets gaps among the old, at the boundary and among the young.
    let conn = rusqlite::Connection::open(&server.db).expect("open the database");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute("UPDATE events SET ts = ts - 3600000 WHERE seq <= 6", [])
        .expect("age the events");
    drop(conn);
    delete_events(&server.db, "aged", &[3, 6, 8]);
    server.restart_with(|c| c.retain_age = Some(Duration::from_secs(1800)));
    let data = || -> Vec<u64> {
        polled(&server, "category=aged&since_time=0")
            .iter()
            .map(|e| e["data"].as_u64().unwrap())
            .collect()
    };
    wait_until(Duration::from_secs(5), "retention to run", || {
        data() == [7, 9, 10]
    });
}

/// With `--retain-acked-only`, count retention keeps the events a known consumer has not
/// acknowledged, says for whom (`/metrics`, `stream show`), and lets them go once that
/// consumer is removed.
#[test]
fn interest_retention_keeps_what_a_known_consumer_has_not_acknowledged() {
    let mut server = TestServer::start();
    let ids: Vec<String> = (1..=10)
        .map(|n| {
            append_ok(
                &server,
                "i",
                "p",
                &json!({"event": {"name": "E"}, "payload": n}),
            )
        })
        .collect();
    for (consumer, id) in [("slow", &ids[2]), ("fast", &ids[8])] {
        let resp = ack_req(&server, "i", id, consumer).send();
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let interest = |c: &mut eventserver::Config| {
        c.retain_events = Some(2);
        c.retain_acked_only = true;
    };
    let sequences = |server: &TestServer| -> Vec<u64> {
        elements(server, "i")
            .iter()
            .map(|e| e["sequence"].as_u64().unwrap())
            .collect()
    };
    // Keeping 2 would delete 1-8; "slow" acknowledged up to 3, so 4-8 stay for it.
    server.restart_with(interest);
    wait_until(Duration::from_secs(5), "retention to run", || {
        sequences(&server) == (4..=10).collect::<Vec<u64>>()
    });
    let metrics = server.req("GET", "/metrics").send().text();
    assert!(
        metrics.contains("eventserver_retention_held_events{stream=\"i\",consumer=\"slow\"} 5\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("consumer=\"fast\"} "), "{metrics}");
    let shown = eventserver::admin::show_stream(&server.db, "i")
        .unwrap()
        .unwrap();
    assert_eq!(shown.held, [("slow".to_owned(), 5)]);

    assert!(eventserver::admin::remove_consumer(&server.db, "i", "slow").unwrap());
    assert!(!eventserver::admin::remove_consumer(&server.db, "i", "slow").unwrap());
    assert!(eventserver::admin::remove_consumer(&server.db, "nowhere", "slow").is_err());
    server.restart_with(interest);
    wait_until(Duration::from_secs(5), "retention to run again", || {
        sequences(&server) == [9, 10]
    });
    let metrics = server.req("GET", "/metrics").send().text();
    assert!(
        !metrics.contains("eventserver_retention_held_events{"),
        "{metrics}"
    );
}
