//! The schema's tests: upgrading a database in place, and what a commit writes.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rusqlite::params;

use super::*;
use crate::clock::Clock;
use crate::config::SyncMode;
use crate::event::{Event, Start};
use crate::store::writer::{self, Done, Job, Payload};
use crate::store::{Reader, admin, open_write};

/// The schema the release before schema 4 made.
const BEFORE: usize = 3;

/// A new database at schema version [`BEFORE`].
fn database_before(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    for (version, sql) in MIGRATIONS[..BEFORE].iter().enumerate() {
        conn.execute_batch(sql).unwrap();
        conn.execute_batch(&format!("PRAGMA user_version={}", version + 1))
            .unwrap();
    }
    conn
}

/// Appends the way the writer before schema 4 did: the whole element in `data`, the
/// stream's row updated. Returns the event as that writer answered it.
fn append_before(
    conn: &Connection,
    stream: &str,
    owner: Option<&str>,
    name: Option<&str>,
    ts: u64,
) -> Event {
    conn.execute(
        "INSERT OR IGNORE INTO streams (name, owner, created_ms) VALUES (?1, ?2, 1)",
        params![stream, owner],
    )
    .unwrap();
    let (stream_id, last_seq): (i64, u64) = conn
        .query_row(
            "SELECT id, last_seq FROM streams WHERE name = ?1",
            [stream],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let (seq, id) = (last_seq + 1, uuid::Uuid::now_v7());
    let data = match name {
        Some(name) => element(&id, seq, ts, &format!(r#","event":{{"name":"{name}"}}"#)),
        None => format!(r#"{{"n":{seq}}}"#),
    };
    conn.execute(
        "INSERT INTO events (stream_id, seq, id, name, ts, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![stream_id, seq, &id.as_bytes()[..], name, ts, data],
    )
    .unwrap();
    conn.execute(
        "UPDATE streams SET owner = ?2, last_seq = ?3, last_ms = ?4 WHERE id = ?1",
        params![stream_id, owner, seq, ts],
    )
    .unwrap();
    Event {
        seq,
        ts,
        id,
        name: name.map(Into::into),
        data: data.into(),
    }
}

/// Everything stored about events and streams, row by row.
fn rows(conn: &Connection) -> Vec<String> {
    let mut stmt = conn
        .prepare(
            "SELECT e.gid, s.name, s.owner, e.seq, hex(e.id), e.name, e.ts, e.data \
             FROM events e JOIN streams s ON s.id = e.stream_id ORDER BY e.gid",
        )
        .unwrap();
    stmt.query_map([], |r| {
        let cells: Vec<String> = (0..8)
            .map(|i| r.get_ref(i).map(|v| format!("{v:?}")))
            .collect::<Result<_, _>>()?;
        Ok(cells.join("|"))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// A database the release before schema 4 wrote is upgraded in place: every event keeps
/// its id, sequence number, timestamp and data, every stream its owner and consumer
/// offsets, and every read answers as before; later appends continue each stream.
#[test]
fn a_database_from_before_schema_4_is_upgraded_in_place_and_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let old = database_before(&path);
    let mut orders = Vec::new();
    for i in 0..40u64 {
        let name = match i {
            30 => "Rare",
            i if i % 2 == 0 => "OrderPlaced",
            _ => "OrderShipped",
        };
        orders.push(append_before(
            &old,
            "orders",
            Some("shop"),
            Some(name),
            1000 + i / 4,
        ));
    }
    let news: Vec<Event> = (0..10)
        .map(|i| append_before(&old, "news", None, None, 2000 + i))
        .collect();
    // An emptied stream: retention took all its events.
    append_before(&old, "gone", None, None, 500);
    old.execute("DELETE FROM events WHERE seq = 1 AND stream_id = 3", [])
        .unwrap();
    old.execute(
        "INSERT INTO offsets (stream_id, consumer, name, seq) VALUES (1, 'billing', 'OrderPlaced', 7)",
        [],
    )
    .unwrap();
    let before = rows(&old);
    drop(old);

    let conn = open_write(&path, SyncMode::Full).unwrap();
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len());
    assert_eq!(rows(&conn), before, "a stored event changed");
    let mut reader = Reader::open(&path).unwrap();

    // The long-poll API: since a time, after a last_id, from now; by position.
    let all = reader.since("orders", &Start::After(0), None, 100).unwrap();
    assert_eq!(all.events, orders);
    assert_eq!(all.hwm, 40);
    let since = reader
        .since(
            "orders",
            &Start::Since {
                ms: 1004,
                last_id: None,
            },
            None,
            100,
        )
        .unwrap();
    assert_eq!(since.events, orders[20..]);
    let after_id = Start::Since {
        ms: 1004,
        last_id: Some(orders[17].id),
    };
    let since = reader.since("orders", &after_id, None, 100).unwrap();
    assert_eq!(since.events, orders[18..]);
    let now = reader.since("orders", &Start::Now, None, 100).unwrap();
    assert!(now.events.is_empty());
    assert_eq!(now.hwm, 40);
    let published = reader.since("news", &Start::After(4), None, 100).unwrap();
    assert_eq!(published.events, news[4..]);
    assert_eq!(reader.seq_of("orders", &orders[9].id).unwrap(), Some(10));

    // The streams API: a consumer's read by name after its offset, elements as stored.
    let placed: Vec<String> = orders
        .iter()
        .filter(|e| e.seq > 7 && e.name.as_deref() == Some("OrderPlaced"))
        .map(|e| e.data.to_string())
        .collect();
    let view = reader
        .consume("orders", "billing", "OrderPlaced", 100)
        .unwrap()
        .unwrap();
    assert_eq!((view.events, view.hwm), (placed, 40));
    let rare = reader.consume("orders", "x", "Rare", 100).unwrap().unwrap();
    assert_eq!(rare.events, [orders[30].data.to_string()]);

    // Operators see the same streams.
    let summaries = admin::list_streams(&path).unwrap();
    let summary = |name: &str| summaries.iter().find(|s| s.name == name).unwrap();
    assert_eq!(summary("orders").owner.as_deref(), Some("shop"));
    assert_eq!(
        (summary("orders").last_seq, summary("orders").last_ms),
        (40, 1009)
    );
    assert_eq!((summary("gone").events, summary("gone").last_seq), (0, 1));

    // Appends go on from each stream's newest sequence number, the emptied one's too,
    // and read back in the same shape.
    let appended = append(conn, &[("orders", true), ("gone", false), ("fresh", true)]);
    assert_eq!(
        appended.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [41, 2, 1]
    );
    let read = reader.since("orders", &Start::After(40), None, 10).unwrap();
    assert_eq!(read.events, appended[..1]);
    assert_eq!(read.hwm, 41);
    let view = reader.consume("orders", "y", "E", 10).unwrap().unwrap();
    assert_eq!(view.events, [appended[0].data.to_string()]);
}

/// A database of a newer schema is refused, by the server and by operator commands
/// alike, and left as it is: what an older eventserver does with a database this one
/// upgraded.
#[test]
fn a_database_of_a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    drop(open_write(&path, SyncMode::Full).unwrap());
    let newer = MIGRATIONS.len() + 1;
    Connection::open(&path)
        .unwrap()
        .execute_batch(&format!("PRAGMA user_version={newer}"))
        .unwrap();
    for opened in [
        open_write(&path, SyncMode::Full).map(drop),
        crate::store::open_existing(&path).map(drop),
    ] {
        match opened {
            Err(StoreError::TooNew { version }) => assert_eq!(version, newer),
            other => panic!("expected TooNew, got {other:?}"),
        }
    }
    let version: usize = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, newer);
}

/// A stream whose every event was deleted (by retention, or an operator) goes on from its
/// newest sequence number and keeps its newest time: the `streams` row, no longer written
/// by appends, takes them from the deleted events.
#[test]
fn an_emptied_stream_never_gives_a_sequence_number_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let conn = open_write(&path, SyncMode::Full).unwrap();
    let first = append(conn, &[("a", true), ("a", true), ("a", false)]);
    let newest = first.last().unwrap();
    let conn = open_write(&path, SyncMode::Full).unwrap();
    let deleted = conn
        .execute(
            "DELETE FROM events WHERE stream_id = (SELECT id FROM streams WHERE name = 'a')",
            [],
        )
        .unwrap();
    assert_eq!(deleted, 3);
    let emptied = admin::list_streams(&path).unwrap();
    assert_eq!(
        (emptied[0].events, emptied[0].last_seq, emptied[0].last_ms),
        (0, 3, newest.ts)
    );
    let next = append(conn, &[("a", true)]);
    assert_eq!(next[0].seq, 4);
}

/// Appends one event to each stream (named or not) through the writer; returns them.
fn append(conn: Connection, streams: &[(&str, bool)]) -> Vec<Event> {
    let (jobs, rx) = crossbeam_channel::unbounded();
    let (events, appended) = crossbeam_channel::unbounded();
    for (stream, named) in streams {
        let events = events.clone();
        jobs.send(Job::Append {
            stream: stream.to_string(),
            producer: Some("shop".into()),
            payload: payload(*named, 0),
            done: Done::new(move |result| events.send(result.unwrap()).unwrap()),
        })
        .unwrap();
    }
    jobs.send(Job::Stop).unwrap();
    writer::run(
        writer::Sqlite::new(conn),
        rx,
        Arc::new(Clock::starting_at(0)),
        |c| c.replies.into_iter().for_each(writer::Answer::send),
    );
    appended.try_iter().map(|e| (*e).clone()).collect()
}

/// What the load bench appends: a streams-API event named `E`, or a `/publish` one.
fn payload(named: bool, n: usize) -> Payload {
    match named {
        true => Payload::Element {
            name: "E".into(),
            fields: format!(r#","event":{{"name":"E"}},"payload":{{"n":{n}}}"#),
        },
        false => Payload::Data(format!(r#"{{"n":{n}}}"#)),
    }
}

/// Bytes a WAL frame takes: its header and a page.
const FRAME: u64 = 24 + 4096;

/// What appending costs the writer.
#[derive(Debug)]
struct Cost {
    frames_per_commit: f64,
    us_per_event: f64,
}

/// Appends `events` through the writer in commits of `batch`, over `streams` streams,
/// after as many again to grow each stream past one index page; returns what the
/// second half cost. The log is never checkpointed here, so its frames are counted by
/// its size.
fn append_cost(named: bool, streams: usize, batch: usize, events: usize) -> Cost {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let conn = open_write(&path, SyncMode::Full).unwrap();
    let (jobs, rx) = crossbeam_channel::unbounded();
    let (commits, committed) = crossbeam_channel::unbounded();
    let writer = std::thread::spawn(move || {
        writer::run(
            writer::Sqlite::new(conn),
            rx,
            Arc::new(Clock::starting_at(0)),
            move |_| commits.send(()).unwrap(),
        )
    });
    let mut n = 0;
    let mut append = |count: usize| {
        for _ in 0..count / batch {
            for _ in 0..batch {
                jobs.send(Job::Append {
                    stream: format!("s{}", n % streams),
                    producer: Some("p".into()),
                    payload: payload(named, n),
                    done: Done::new(|result| drop(result.unwrap())),
                })
                .unwrap();
                n += 1;
            }
            committed.recv().unwrap();
        }
    };
    let wal = dir.path().join("t.db-wal");
    let frames = || std::fs::metadata(&wal).unwrap().len() / FRAME;
    append(events);
    let (frames_before, started) = (frames(), Instant::now());
    append(events);
    let took = started.elapsed();
    let frames = frames() - frames_before;
    jobs.send(Job::Stop).unwrap();
    writer.join().unwrap();
    Cost {
        frames_per_commit: frames as f64 / (events / batch) as f64,
        us_per_event: took.as_secs_f64() * 1e6 / events as f64,
    }
}

/// Prints what a commit writes for each API over one stream and 64 (the table in the
/// module docs); run with `cargo test --release --lib append_costs -- --ignored
/// --nocapture`. Its µs per event include the disk's syncs, which vary from run to run.
#[test]
#[ignore = "a measurement, not a check: prints figures"]
fn append_costs() {
    for (named, api) in [(false, "/publish"), (true, "streams API")] {
        for (streams, batch) in [(1, 64), (64, 16), (64, 64)] {
            let cost = append_cost(named, streams, batch, 64 * 1000);
            println!(
                "| {batch} {api} events over {streams} streams | {:.1} ({:.2} per event) \
                 | {:.1} µs per event |",
                cost.frames_per_commit,
                cost.frames_per_commit / batch as f64,
                cost.us_per_event
            );
        }
    }
}

/// The pages of the log's frames from `from` on.
fn pages_written(wal: &Path, from: u64) -> Vec<u32> {
    let log = std::fs::read(wal).unwrap();
    let frames = (log.len() as u64 - 32) / FRAME;
    (from..frames)
        .map(|i| {
            let at = (32 + i * FRAME) as usize;
            u32::from_be_bytes(log[at..at + 4].try_into().unwrap())
        })
        .collect()
}

/// From schema 4, appending to existing streams writes no page of the `streams` table,
/// and a named event's row holds its members, not its metadata again.
#[test]
fn appends_leave_the_streams_table_alone_and_store_only_members() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let wal = dir.path().join("t.db-wal");
    let streams = [("a", true), ("b", false), ("c", true)];
    append(open_write(&path, SyncMode::Full).unwrap(), &streams);
    let conn = open_write(&path, SyncMode::Full).unwrap();
    // Few rows: the table and its name index are a page each, their roots.
    let streams_pages: Vec<u32> = conn
        .prepare("SELECT rootpage FROM sqlite_schema WHERE tbl_name = 'streams'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    // Open, it keeps the writer's connection from removing the log when it closes.
    let keeper = Reader::open(&path).unwrap();
    keeper.seq_of("a", &uuid::Uuid::nil()).unwrap();
    let from = std::fs::metadata(&wal).map_or(0, |m| m.len().saturating_sub(32) / FRAME);
    let appended = append(conn, &streams);
    assert_eq!(
        appended.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [2, 2, 2]
    );
    let written = pages_written(&wal, from);
    drop(keeper);
    assert!(!written.is_empty());
    assert_eq!(streams_pages.len(), 2);
    for page in &streams_pages {
        assert!(
            !written.contains(page),
            "page {page} of streams in {written:?}"
        );
    }
    let stored: Vec<String> = Connection::open(&path)
        .unwrap()
        .prepare("SELECT data FROM events WHERE name IS NOT NULL")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored.len(), 4);
    for data in stored {
        assert!(data.starts_with(r#","event":"#), "{data}");
    }
}
