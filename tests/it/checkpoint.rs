//! Checkpoints off the writer's path: a read held open keeps the write-ahead log from
//! starting over, which `/metrics` shows, and once it ends the log starts over and is cut
//! back to its size limit.

use std::time::Duration;

use serde_json::json;

use crate::support::{TestServer, heavy, publish_ok, wait_until};

/// The value of the unlabelled metric `name` in `/metrics`.
fn metric(server: &TestServer, name: &str) -> u64 {
    let resp = server.req("GET", "/metrics").send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let prefix = format!("{name} ");
    resp.text()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

const MIB: u64 = 1 << 20;

#[test]
fn a_long_held_read_shows_in_the_wal_metrics_and_the_log_shrinks_once_it_ends() {
    let _heavy = heavy();
    let server = TestServer::start();
    publish_ok(&server, "c", &json!("first"));
    // A read transaction on a snapshot from before the events below: no checkpoint may
    // copy past it, and the log cannot start over while it is open.
    let reader = rusqlite::Connection::open(&server.db).expect("open the database");
    reader.execute_batch("BEGIN").unwrap();
    let before: i64 = reader
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(before, 1);

    // About 40 MiB of events, past the log's 32 MiB size limit.
    let blob = "x".repeat(60_000);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..170 {
                    publish_ok(&server, "c", &json!({ "blob": blob }));
                }
            });
        }
    });
    wait_until(
        Duration::from_secs(10),
        "the metrics to show the log",
        || {
            metric(&server, "eventserver_wal_bytes") > 32 * MIB
                && metric(&server, "eventserver_wal_pending_bytes") > 32 * MIB
        },
    );
    let held: i64 = reader
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(held, 1, "the read still sees its snapshot");

    drop(reader);
    // The checkpoint thread retries with a growing pause; the writer starts the log over at
    // its next commit after a RESTART went through.
    wait_until(Duration::from_secs(20), "the log to start over", || {
        publish_ok(&server, "c", &json!("more"));
        metric(&server, "eventserver_wal_bytes") < 16 * MIB
    });
    let wal = std::fs::metadata(server.db.with_extension("db-wal")).expect("the log");
    assert!(
        wal.len() <= 32 * MIB,
        "the log was cut back to its size limit: {} bytes",
        wal.len()
    );
}
