//! Retention: at most N events per stream, or none older than an age, oldest deleted first,
//! sequence numbers kept; interest retention, which keeps what known consumers have not
//! acknowledged; reads by time over a stream whose sequence has gaps; and a large backlog
//! trimmed in chunks while producers go on.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    TestServer, ack_req, append_ok, consume_req, event, heavy, publish_ok, subscribe_req,
    wait_until,
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

/// Adds `n` events to the end of `stream` (which exists) straight into the database, named
/// by `name_of(seq)`, as a server that ran for long would hold them; returns the stream's
/// new last sequence number. The server must not be running.
fn backlog(db: &Path, stream: &str, n: u64, name_of: fn(u64) -> &'static str) -> u64 {
    let mut conn = rusqlite::Connection::open(db).expect("open the database");
    let tx = conn.transaction().unwrap();
    let (id, last): (i64, u64) = tx
        .query_row(
            "SELECT id, last_seq FROM stream_heads WHERE name = ?1",
            [stream],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("the stream exists");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO events (stream_id, seq, id, name, ts, data) \
                 VALUES (?1, ?2, ?3, ?4, 1, ?5)",
            )
            .unwrap();
        for seq in last + 1..=last + n {
            let uuid = uuid::Uuid::now_v7();
            let name = name_of(seq);
            let data = json!({"eventId": uuid, "sequence": seq, "timestamp": 1,
                              "event": {"name": name}});
            insert
                .execute(rusqlite::params![
                    id,
                    seq as i64,
                    &uuid.as_bytes()[..],
                    name,
                    data.to_string()
                ])
                .unwrap();
        }
    }
    tx.execute(
        "UPDATE streams SET last_seq = ?2 WHERE id = ?1",
        rusqlite::params![id, (last + n) as i64],
    )
    .unwrap();
    tx.commit().unwrap();
    last + n
}

/// A stopped server whose `stream` (producer "p") holds `n + 1` events, named by
/// `name_of(seq)`; and the stream's last sequence number.
fn stopped_with_backlog(
    stream: &str,
    n: u64,
    name_of: fn(u64) -> &'static str,
) -> (TestServer, u64) {
    let mut server = TestServer::start();
    append_ok(&server, stream, "p", &event(name_of(1)));
    server.handle.take().unwrap().shutdown();
    let last = backlog(&server.db, stream, n, name_of);
    (server, last)
}

/// Commits of one job in `/metrics`: each retention chunk is one, as is each lone append.
fn single_job_commits(server: &TestServer) -> u64 {
    let metrics = server.req("GET", "/metrics").send().text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("eventserver_writer_batch_size_bucket{le=\"1\"} "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the batch size histogram")
}

/// Turning retention on over a large backlog deletes it in chunks, each a transaction of
/// its own, with appends to the same stream answered 200 between them.
#[test]
fn a_large_backlog_is_trimmed_in_chunks_between_appends() {
    let _heavy = heavy();
    let (mut server, last) = stopped_with_backlog("big", 60_000, |_| "E");
    server.restart_with(|c| c.retain_events = Some(100));
    let reads = rusqlite::Connection::open(&server.db).unwrap();
    let oldest = || -> u64 {
        reads
            .query_row("SELECT min(seq) FROM events", [], |r| r.get(0))
            .unwrap()
    };
    let (mut appended, mut part_way) = (0, 0);
    wait_until(Duration::from_secs(60), "the backlog to be trimmed", || {
        append_ok(&server, "big", "p", &event("E"));
        appended += 1;
        let oldest = oldest();
        if oldest > 1 && oldest <= last - 100 {
            part_way += 1;
        }
        oldest > last - 100
    });
    assert!(part_way > 0, "no append was answered part-way through");
    let chunks = single_job_commits(&server) - appended;
    assert!(chunks >= 5, "20,000 events went in {chunks} transactions");
}

/// Interest retention over chunks: what a consumer holds back is counted once across all
/// of them, and only the events it has not acknowledged stay.
#[test]
fn interest_retention_counts_what_it_holds_across_chunks() {
    let _heavy = heavy();
    // Odd sequence numbers are E, even ones F; "c" acknowledges E up to 9.
    let (mut server, last) = stopped_with_backlog("h", 6_999, |seq| match seq % 2 {
        1 => "E",
        _ => "F",
    });
    server.restart();
    let nine: String = rusqlite::Connection::open(&server.db)
        .unwrap()
        .query_row("SELECT id FROM events WHERE seq = 9", [], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .map(|id| uuid::Uuid::from_slice(&id).unwrap().to_string())
        .unwrap();
    let resp = ack_req(&server, "h", &nine, "c").send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    server.restart_with(|c| {
        c.retain_events = Some(100);
        c.retain_acked_only = true;
    });
    // The limit reaches 1..=6900: every F there goes, and E up to 9; E from 11 stays.
    let cutoff = last - 100;
    let held = (11..=cutoff).filter(|seq| seq % 2 == 1).count();
    wait_until(Duration::from_secs(60), "retention to run", || {
        let shown = eventserver::admin::show_stream(&server.db, "h");
        shown.unwrap().unwrap().held == [("c".to_owned(), held as u64)]
    });
    let reads = rusqlite::Connection::open(&server.db).unwrap();
    let kept: u64 = reads
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept as usize, held + 100);
    let metrics = server.req("GET", "/metrics").send().text();
    let line = format!("eventserver_retention_held_events{{stream=\"h\",consumer=\"c\"}} {held}\n");
    assert!(metrics.contains(&line), "{metrics}");
}
