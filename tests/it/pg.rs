//! PostgreSQL: how `--db postgres://…` is taken in either build, and, with the `postgres`
//! feature, the store's contracts for several nodes against a real throwaway cluster
//! ([`Postgres`]): migrations run once when nodes start together, a newer schema is
//! refused, appends through two nodes are gapless and totally ordered, a race for a new
//! stream has exactly one winner, ACKs through two nodes only move an offset forward, and
//! reads answer as SQLite's reader does for every cursor, gaps included; and (`node`) the
//! status page's and metrics' reads, retention run by one node at a time in bounded
//! chunks, and the wake-up every append sends to every node's listener.
//!
//! Each "node" is a thread with a connection of its own ([`eventserver::pg::Database`]):
//! to PostgreSQL, that is exactly what two processes are.

use crate::support::run;

/// A URL whose password must never be printed.
const URL: &str = "postgres://app:s3cret-pw@127.0.0.1:1/events";

/// `serve` given `url` as a flag, then `command` given it in `EVENTSERVER_DB`, exit 2 with
/// `needle` on stderr, never showing the password.
#[track_caller]
fn refused(url: &str, needle: &str, command: &[&str]) {
    let flag = run(
        &["serve", "--db", url, "--listen", "127.0.0.1:0"],
        &[],
        None,
    );
    let flag = flag.fails(2, needle);
    assert!(flag.stderr.contains("--db "), "{}", flag.stderr);
    let env = run(command, &[("EVENTSERVER_DB", url)], None);
    let env = env.fails(2, needle);
    assert!(env.stderr.contains("EVENTSERVER_DB "), "{}", env.stderr);
    for out in [flag, env] {
        assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
        assert!(!out.stdout.contains("s3cret"), "{}", out.stdout);
    }
}

#[cfg(not(feature = "postgres"))]
#[test]
fn a_postgres_url_in_a_build_without_the_feature_says_how_to_build_one() {
    for url in [URL, "postgresql://app:s3cret@db.example/events"] {
        refused(
            url,
            "cargo build --release --features postgres",
            &["user", "list"],
        );
    }
}

#[cfg(feature = "postgres")]
#[test]
fn a_postgres_url_this_build_cannot_use_is_refused_by_every_command() {
    let serve = ["serve", "--listen", "127.0.0.1:0"];
    for command in [&serve[..], &["user", "list"]] {
        refused(
            "postgres://app:s3cret@db/events?sslmode=require",
            "sslmode=require is not supported yet",
            command,
        );
    }
}

/// The user commands connect; an unreachable database fails them (exit 1) at once, without
/// showing the password.
#[cfg(feature = "postgres")]
#[test]
fn a_user_command_on_an_unreachable_database_fails_without_showing_the_password() {
    let out = run(&["user", "list", "--db", URL], &[], None).fails(1, "error connecting");
    assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
}

#[cfg(feature = "postgres")]
#[test]
fn a_url_eventserver_cannot_use_is_refused_without_quoting_its_password() {
    use eventserver::pg::check_url;
    assert_eq!(check_url("postgres://app:pw@db:5432/events"), Ok(()));
    assert_eq!(check_url("postgresql://app@localhost/events"), Ok(()));
    for (url, why) in [
        ("postgres://db/events", "no user"),
        (
            "postgres://app:s3cret@db/events?sslmode=require",
            "sslmode=require",
        ),
        ("postgres://app:s3cret@db:port/events", "does not parse"),
        (
            "postgres://app:s3cret@db/events?bogus=s3cret",
            "does not parse",
        ),
    ] {
        let refused = check_url(url).unwrap_err();
        assert!(refused.contains(why), "{url}: {refused}");
        assert!(!refused.contains("s3cret"), "{url}: {refused}");
    }
}

#[cfg(feature = "postgres")]
#[test]
fn an_unreachable_database_fails_at_once_without_showing_the_password() {
    let started = std::time::Instant::now();
    let Err(e) = eventserver::pg::Database::open(URL) else {
        panic!("nothing listens on port 1");
    };
    let message = e.to_string();
    assert!(
        message.starts_with("error connecting to server: "),
        "{message}"
    );
    assert!(!message.contains("s3cret"), "{message}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[cfg(feature = "postgres")]
mod cluster {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    use std::thread;

    use eventserver::Start;
    use eventserver::pg::{Ack, Append, Database, Event, Outcome, Payload, PgError};

    use crate::support::{Finished, Postgres, proc_status, run};

    /// The tests run as root in CI, where PostgreSQL would refuse to start: the cluster and
    /// its files belong to another account, and nothing of it outlives the test.
    #[test]
    fn a_throwaway_cluster_runs_unprivileged_and_is_gone_when_dropped() {
        let test = "a_throwaway_cluster_runs_unprivileged_and_is_gone_when_dropped";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let data = pg.psql("postgres", "SHOW data_directory");
        let port: u16 = pg.psql("postgres", "SHOW port").parse().unwrap();
        // A process that lives as long as the server (psql's own backend ends with it).
        let checkpointer = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'";
        let server: u32 = pg.psql("postgres", checkpointer).parse().unwrap();
        let uid = proc_status(server, "Uid").expect("the server's status");
        assert_ne!(uid, 0, "PostgreSQL runs as root");
        assert_eq!(std::fs::metadata(&data).unwrap().uid() as u64, uid);
        // A node's way in: TCP with a password, to a database of the test's own.
        let url = pg.database("node");
        assert!(url.ends_with(&format!("@127.0.0.1:{port}/node")), "{url}");
        assert_eq!(pg.psql("node", "SELECT current_database()"), "node");
        drop(pg);
        assert!(!std::path::Path::new(&data).exists(), "{data} is left");
        let refused = std::net::TcpStream::connect(("127.0.0.1", port));
        assert!(refused.is_err(), "something still listens on {port}");
    }

    /// Runs `node(i)` on `n` threads released together, and returns what each returned.
    fn together<T: Send + 'static>(
        n: usize,
        node: impl Fn(usize) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let start = Arc::new(Barrier::new(n));
        let node = Arc::new(node);
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (start, node) = (start.clone(), node.clone());
                thread::spawn(move || {
                    start.wait();
                    node(i)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    /// The stored events of `stream`: sequence number, timestamp, data, in `seq` order.
    fn stored(pg: &Postgres, db: &str, stream: &str) -> Vec<(u64, u64, String)> {
        let rows = pg.psql(
            db,
            &format!(
                "SELECT e.seq, e.ts, e.data FROM events e JOIN streams s ON s.id = e.stream_id \
                 WHERE s.name = '{stream}' ORDER BY e.seq"
            ),
        );
        rows.lines()
            .map(|line| {
                let mut fields = line.splitn(3, '|');
                let mut next = || fields.next().unwrap().to_owned();
                (next().parse().unwrap(), next().parse().unwrap(), next())
            })
            .collect()
    }

    #[test]
    fn migrations_run_once_when_nodes_start_together() {
        let Some(pg) = Postgres::start_or_skip("migrations_run_once_when_nodes_start_together")
        else {
            return;
        };
        for round in 0..3 {
            let url = pg.database(&format!("round{round}"));
            // A second run of the migrations would fail on tables that exist.
            let opened = together(8, move |_| Database::open(&url)?.schema_version());
            let versions: Vec<usize> = opened
                .into_iter()
                .enumerate()
                .map(|(node, result)| {
                    result.unwrap_or_else(|e| panic!("round {round}, node {node}: {e}"))
                })
                .collect();
            assert!(
                versions.iter().all(|v| *v == versions[0] && *v > 0),
                "{versions:?}"
            );
            let db = format!("round{round}");
            assert_eq!(pg.psql(&db, "SELECT count(*) FROM eventserver_schema"), "1");
            assert_eq!(pg.psql(&db, "SELECT count(*) FROM streams"), "0");
        }
    }

    #[test]
    fn a_database_migrated_by_a_newer_eventserver_is_refused() {
        let Some(pg) =
            Postgres::start_or_skip("a_database_migrated_by_a_newer_eventserver_is_refused")
        else {
            return;
        };
        let url = pg.database("newer");
        let known = Database::open(&url).unwrap().schema_version().unwrap();
        let newer = known + 1;
        pg.psql(
            "newer",
            &format!("UPDATE eventserver_schema SET version = {newer}"),
        );
        match Database::open(&url) {
            Err(e @ PgError::TooNew { version }) => {
                assert_eq!(version, newer);
                assert_eq!(
                    e.to_string(),
                    format!(
                        "the database has schema version {newer}, newer than this eventserver \
                         knows ({known})"
                    )
                );
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a newer schema was accepted"),
        }
        let version = pg.psql("newer", "SELECT version FROM eventserver_schema");
        assert_eq!(version, newer.to_string(), "the refusal changed nothing");
    }

    /// Batches each node of the two-node test commits.
    const BATCHES: usize = 40;
    /// Appends in each of those batches.
    const PER_BATCH: usize = 25;

    /// Two nodes append to streams `a` and `b` at once, in batches that name them in
    /// opposite orders, node 1's clock 5 s behind node 0's. Every stream's sequence numbers
    /// are 1..=n with no gap, each node's events keep their order and each batch's events
    /// for a stream are consecutive, and timestamps never decrease along a stream. Meanwhile
    /// a reader never sees a gap: what is visible of a stream is always 1..=its newest.
    #[test]
    fn two_nodes_appending_to_one_stream_get_gapless_ordered_sequences() {
        let Some(pg) = Postgres::start_or_skip(
            "two_nodes_appending_to_one_stream_get_gapless_ordered_sequences",
        ) else {
            return;
        };
        let url = pg.database("nodes");
        // The schema first, for the reader.
        Database::open(&url).unwrap();
        let writing = AtomicBool::new(true);
        let reader = || {
            let mut reads = 0;
            while writing.load(Ordering::Relaxed) {
                // One statement, one snapshot.
                let gapless = pg.psql(
                    "nodes",
                    "SELECT count(*) = max(seq) FROM events GROUP BY stream_id",
                );
                assert!(!gapless.contains('f'), "a reader saw a gap: {gapless:?}");
                reads += 1;
            }
            reads
        };
        let (reads, returned) = thread::scope(|s| {
            let reads = s.spawn(reader);
            // However the nodes end, the reader stops: a failed node fails the test
            // rather than hang it.
            let returned = panic::catch_unwind(AssertUnwindSafe(|| {
                together(2, move |node| appends_of(&url, node))
            }));
            writing.store(false, Ordering::Relaxed);
            let returned = returned.unwrap_or_else(|failed| panic::resume_unwind(failed));
            (reads.join().unwrap(), returned)
        });
        assert!(reads > 0, "the reader read while the nodes wrote");
        for stream in ["a", "b"] {
            let events = stored(&pg, "nodes", stream);
            let n = events.len() as u64;
            assert_eq!(
                n,
                (BATCHES * PER_BATCH) as u64,
                "{stream}: both nodes' halves"
            );
            let seqs: Vec<u64> = events.iter().map(|(seq, ..)| *seq).collect();
            assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{stream}: gapless");
            for pair in events.windows(2) {
                assert!(pair[0].1 <= pair[1].1, "{stream}: time went back: {pair:?}");
            }
            for (node, batches) in returned.iter().enumerate() {
                let mine: Vec<usize> = events
                    .iter()
                    .filter_map(|(_, _, data)| {
                        let rest = data.trim_matches('"').strip_prefix(&format!("{node}-"))?;
                        Some(rest.parse().unwrap())
                    })
                    .collect();
                assert!(
                    mine.windows(2).all(|w| w[0] < w[1]),
                    "{stream}: node {node}'s events out of order"
                );
                for batch in &batches[stream] {
                    assert!(
                        batch.windows(2).all(|w| w[1] == w[0] + 1),
                        "{stream}: node {node}'s batch interleaved: {batch:?}"
                    );
                }
            }
        }
    }

    /// What node `node` of the two-node test does: [`BATCHES`] batches of [`PER_BATCH`]
    /// appends over streams `a` and `b`, and the sequence numbers each batch got, per stream.
    fn appends_of(url: &str, node: usize) -> HashMap<&'static str, Vec<Vec<u64>>> {
        let mut db = Database::open(url).unwrap();
        let streams = match node {
            0 => ["a", "b"],
            _ => ["b", "a"],
        };
        let clock = 1_000_000_u64 - 5_000 * node as u64;
        let mut seqs: HashMap<&str, Vec<Vec<u64>>> = HashMap::new();
        for batch in 0..BATCHES {
            let payloads: Vec<Payload> = (0..PER_BATCH)
                .map(|i| Payload::Data(format!("\"{node}-{}\"", batch * PER_BATCH + i)))
                .collect();
            let appends: Vec<Append> = payloads
                .iter()
                .enumerate()
                .map(|(i, payload)| Append {
                    stream: streams[i * 2 / PER_BATCH],
                    producer: None,
                    payload,
                })
                .collect();
            let outcomes = db.append(&appends, clock + batch as u64).unwrap();
            for stream in streams {
                seqs.entry(stream).or_default().push(Vec::new());
            }
            for (append, outcome) in appends.iter().zip(outcomes) {
                let Outcome::Stored(event) = outcome else {
                    panic!("node {node}: {outcome:?}");
                };
                let batches = seqs.get_mut(append.stream).unwrap();
                batches.last_mut().unwrap().push(event.seq);
            }
        }
        seqs
    }

    /// Four producers on four nodes append to the same new stream at once, many times:
    /// each time exactly one of them creates and owns it, the others get the producer lock.
    #[test]
    fn a_race_for_a_new_stream_has_exactly_one_winner() {
        let Some(pg) = Postgres::start_or_skip("a_race_for_a_new_stream_has_exactly_one_winner")
        else {
            return;
        };
        const ROUNDS: usize = 20;
        let url = pg.database("race");
        let round_starts = Arc::new(Barrier::new(4));
        let won = together(4, move |node| {
            let mut db = Database::open(&url).unwrap();
            let producer = format!("producer-{node}");
            let payload = Payload::Element {
                name: "claimed".into(),
                fields: ",\"event\":{}".into(),
            };
            (0..ROUNDS)
                .map(|round| {
                    round_starts.wait();
                    let stream = format!("race-{round}");
                    let append = Append {
                        stream: &stream,
                        producer: Some(&producer),
                        payload: &payload,
                    };
                    match db.append(&[append], 1).unwrap().pop().unwrap() {
                        Outcome::Stored(event) => {
                            assert_eq!(event.seq, 1);
                            true
                        }
                        Outcome::Locked => false,
                    }
                })
                .collect::<Vec<bool>>()
        });
        for round in 0..ROUNDS {
            let winners: Vec<usize> = won
                .iter()
                .enumerate()
                .filter_map(|(node, won)| won[round].then_some(node))
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
            let owner = pg.psql(
                "race",
                &format!("SELECT owner FROM streams WHERE name = 'race-{round}'"),
            );
            assert_eq!(owner, format!("producer-{}", winners[0]));
        }
    }

    /// `producer`'s appends of `payloads` to `stream`, one batch: the events' ids.
    fn ids_of(
        db: &mut Database,
        stream: &str,
        producer: Option<&str>,
        payloads: &[Payload],
    ) -> Vec<uuid::Uuid> {
        let appends: Vec<Append> = payloads
            .iter()
            .map(|payload| Append {
                stream,
                producer,
                payload,
            })
            .collect();
        let outcomes = db.append(&appends, 1).unwrap();
        outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Outcome::Stored(event) => event.id,
                Outcome::Locked => panic!("{stream} is owned by another producer"),
            })
            .collect()
    }

    /// One node acknowledges a consumer's 100 events oldest first, another newest first,
    /// one ACK per transaction, at once: the offset ends at the newest, and a late ACK of
    /// an older event does not move it back. ACKs of unknown events, of events of another
    /// stream and of `/publish` events (no name) find nothing.
    #[test]
    fn acks_through_two_nodes_only_move_an_offset_forward() {
        let Some(pg) =
            Postgres::start_or_skip("acks_through_two_nodes_only_move_an_offset_forward")
        else {
            return;
        };
        let url = pg.database("acks");
        let mut db = Database::open(&url).unwrap();
        let placed: Vec<Payload> = (0..100)
            .map(|_| Payload::Element {
                name: "placed".into(),
                fields: ",\"event\":{}".into(),
            })
            .collect();
        let ids = ids_of(&mut db, "orders", Some("shop"), &placed);
        let published = ids_of(&mut db, "news", None, &[Payload::Data("1".into())])[0];
        let offset = || {
            pg.psql(
                "acks",
                "SELECT o.seq FROM offsets o JOIN streams s ON s.id = o.stream_id \
                 WHERE s.name = 'orders' AND o.consumer = 'billing' AND o.name = 'placed'",
            )
        };
        let acked = {
            let (url, ids) = (url.clone(), ids.clone());
            together(2, move |node| {
                let mut db = Database::open(&url).unwrap();
                let mut order = ids.clone();
                if node == 1 {
                    order.reverse();
                }
                order.into_iter().all(|id| {
                    let ack = Ack {
                        stream: "orders",
                        consumer: "billing",
                        id,
                    };
                    db.ack(&[ack]).unwrap() == [true]
                })
            })
        };
        assert_eq!(acked, [true, true], "every ACK found its event");
        assert_eq!(offset(), "100");
        let ack = |stream, id| Ack {
            stream,
            consumer: "billing",
            id,
        };
        let found = db
            .ack(&[
                ack("orders", ids[0]),
                ack("orders", uuid::Uuid::now_v7()),
                ack("news", ids[5]),
                ack("news", published),
            ])
            .unwrap();
        assert_eq!(found, [true, false, false, false]);
        assert_eq!(
            offset(),
            "100",
            "an older event's ACK moved the offset back"
        );
    }

    /// Appends `batches` to `stream` through `db`, each batch `(ts, names)` stamped `ts`:
    /// a named event per `Some` name, a `/publish` event per `None`. Returns the events as
    /// the append returned them.
    fn append_all(
        db: &mut Database,
        stream: &str,
        batches: &[(u64, Vec<Option<&str>>)],
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for (ts, names) in batches {
            let payloads: Vec<Payload> = names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let n = events.len() + i;
                    match name {
                        Some(name) => Payload::Element {
                            name: (*name).into(),
                            fields: format!(",\"event\":{{\"n\":{n}}}"),
                        },
                        None => Payload::Data(format!("{{\"n\":{n}}}")),
                    }
                })
                .collect();
            let appends: Vec<Append> = payloads
                .iter()
                .map(|payload| Append {
                    stream,
                    producer: None,
                    payload,
                })
                .collect();
            for outcome in db.append(&appends, *ts).unwrap() {
                let Outcome::Stored(event) = outcome else {
                    panic!("{stream}: {outcome:?}");
                };
                events.push(event);
            }
        }
        events
    }

    /// Events appended through a node read back as they were appended: by position, by
    /// name after a consumer's offset, by id; a user as stored; a stream that does not
    /// exist reads as empty.
    #[test]
    fn events_appended_through_a_node_read_back_as_appended() {
        let test = "events_appended_through_a_node_read_back_as_appended";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("reads");
        let mut db = Database::open(&url).unwrap();
        let batches = [
            (5, vec![Some("placed"), None, Some("paid")]),
            (7, vec![Some("placed")]),
        ];
        let events = append_all(&mut db, "orders", &batches);
        let view = db.since("orders", &Start::After(0), None, 100).unwrap();
        assert_eq!(view.events, events);
        assert_eq!(view.hwm, 4);
        let now = db.since("orders", &Start::Now, None, 100).unwrap();
        assert!(now.events.is_empty(), "{:?}", now.events);
        assert_eq!(now.hwm, 4);
        let missing = db.since("nowhere", &Start::After(0), None, 100).unwrap();
        assert_eq!((missing.events.len(), missing.hwm), (0, 0));

        let consume = |db: &mut Database| {
            let view = db.consume("orders", "billing", "placed", 100).unwrap();
            let view = view.expect("orders exists");
            assert_eq!(view.hwm, 4);
            view.events
        };
        let placed = [&*events[0].data, &*events[3].data];
        assert_eq!(consume(&mut db), placed);
        let ack = Ack {
            stream: "orders",
            consumer: "billing",
            id: events[0].id,
        };
        assert_eq!(db.ack(&[ack]).unwrap(), [true]);
        assert_eq!(consume(&mut db), placed[1..]);
        let none = db.consume("nowhere", "billing", "placed", 100).unwrap();
        assert!(none.is_none(), "{none:?}");

        for event in &events {
            assert_eq!(db.seq_of("orders", &event.id).unwrap(), Some(event.seq));
            assert_eq!(db.seq_of("other", &event.id).unwrap(), None);
        }
        assert_eq!(db.seq_of("orders", &uuid::Uuid::now_v7()).unwrap(), None);

        assert!(db.user("ada").unwrap().is_none());
        pg.psql(
            "reads",
            "INSERT INTO users (name, hash, produce, consume, created_ms) \
             VALUES ('ada', 'h4sh', 'orders*', '', 0)",
        );
        let ada = db.user("ada").unwrap().expect("ada is stored");
        assert_eq!(
            (&*ada.hash, &*ada.produce, &*ada.consume),
            ("h4sh", "orders*", "")
        );
    }

    /// Every read of a stream whose timestamps repeat and whose sequence numbers have gaps
    /// (events deleted, the newest among them) answers as SQLite's reader does: for
    /// `since_time` over every millisecond around the stream's, with every `last_id` (none,
    /// each stored event's, a deleted event's, another stream's, an unknown one), for every
    /// `After(seq)` and for `Now`, with and without a name filter, under a small and a large
    /// limit. The expected answers are SQLite's contract written as a filter over the
    /// stored events: newer than `ms`, or at exactly `ms` after `last_id` (all of them at
    /// `ms` when `last_id` is not among them), with the high-water mark the newest sequence
    /// number the stream ever gave.
    #[test]
    fn since_reads_with_gaps_answer_as_sqlite_does_for_every_cursor() {
        let test = "since_reads_with_gaps_answer_as_sqlite_does_for_every_cursor";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("cursors");
        let mut db = Database::open(&url).unwrap();
        let (a, b) = (Some("a"), Some("b"));
        // Three or so events a millisecond, some milliseconds with none; a batch stamped
        // earlier than the last one is stamped at the stream's last time instead.
        let batches = [
            (1000, vec![a, None, b]),
            (1000, vec![a]),
            (1002, vec![None, None]),
            (1003, vec![b, a, a, None]),
            (1001, vec![b]),
            (1005, vec![a]),
            (1006, vec![None, b, a]),
            (1006, vec![a, a]),
            (1009, vec![b, None, a]),
        ];
        let appended = append_all(&mut db, "s", &batches);
        let other = append_all(&mut db, "other", &[(1003, vec![a])]);
        let hwm = appended.len() as u64;
        // Gaps: a lone event, a run, and the newest two.
        let deleted = [2, 7, 8, 9, hwm - 1, hwm];
        pg.psql(
            "cursors",
            &format!(
                "DELETE FROM events WHERE stream_id = (SELECT id FROM streams WHERE name = 's') \
                 AND seq IN ({})",
                deleted.map(|seq| seq.to_string()).join(",")
            ),
        );
        let stored: Vec<&Event> = appended
            .iter()
            .filter(|e| !deleted.contains(&e.seq))
            .collect();
        let mut last_ids: Vec<Option<uuid::Uuid>> = vec![
            None,
            Some(uuid::Uuid::now_v7()),
            Some(other[0].id),
            Some(appended[8].id),
        ];
        last_ids.extend(stored.iter().map(|e| Some(e.id)));
        let names = [None, Some("a"), Some("b"), Some("missing")];
        let mut reads = 0;
        let mut check = |db: &mut Database, start: Start, expected: &dyn Fn(&Event) -> bool| {
            for name in names {
                for limit in [2, 100] {
                    let want: Vec<&Event> = stored
                        .iter()
                        .copied()
                        .filter(|e| expected(e) && (name.is_none() || e.name.as_deref() == name))
                        .take(limit)
                        .collect();
                    let view = db.since("s", &start, name, limit).unwrap();
                    let got: Vec<&Event> = view.events.iter().collect();
                    assert_eq!(got, want, "{start:?}, name {name:?}, limit {limit}");
                    assert_eq!(view.hwm, hwm, "{start:?}");
                    reads += 1;
                }
            }
        };
        for ms in 998..=1011 {
            for last_id in &last_ids {
                let at = stored.iter().find(|e| Some(e.id) == *last_id && e.ts == ms);
                let expected = |e: &Event| match at {
                    Some(seen) => e.ts > ms || (e.ts == ms && e.seq > seen.seq),
                    None => e.ts > ms || (e.ts == ms && last_id.is_some()),
                };
                let start = Start::Since {
                    ms,
                    last_id: *last_id,
                };
                check(&mut db, start, &expected);
            }
        }
        for after in 0..=hwm + 1 {
            check(&mut db, Start::After(after), &|e| e.seq > after);
        }
        check(&mut db, Start::Now, &|_| false);
        assert!(reads > 1000, "{reads} reads");
    }

    /// `user add/list/remove` on PostgreSQL answer as on SQLite, migrating a fresh database
    /// first and storing the same argon2id hashes; `backup` points to pg_dump and writes
    /// nothing; `serve` is still refused; no message shows the password.
    #[test]
    fn user_commands_run_on_postgres_and_the_others_say_what_to_do() {
        let test = "user_commands_run_on_postgres_and_the_others_say_what_to_do";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("admin");
        let secret = Postgres::PASSWORD;
        let shown = |out: &Finished| {
            for text in [&out.stdout, &out.stderr] {
                assert!(!text.contains("s3cret"), "{text}");
            }
        };
        let cli = |args: &[&str], stdin: Option<&str>| {
            let mut args = args.to_vec();
            args.extend(["--db", &url]);
            let out = run(&args, &[], stdin);
            shown(&out);
            out
        };
        let added = cli(&["user", "add", "alice"], Some("pw-one\n")).ok();
        assert_eq!(added.stdout, "added user 'alice'\n");
        assert_eq!(
            pg.psql("admin", "SELECT version FROM eventserver_schema"),
            "1"
        );
        let again = cli(&["user", "add", "alice"], Some("pw-two\n")).ok();
        assert_eq!(again.stdout, "replaced the password of user 'alice'\n");
        let limited = [
            "user",
            "add",
            "bob",
            "--produce",
            "orders-*",
            "--consume",
            "",
        ];
        cli(&limited, Some("pw-bob\n")).ok();
        cli(&["user", "add", "carol"], Some("\n")).fails(2, "must not be empty");
        let listed = cli(&["user", "list"], None).ok();
        assert_eq!(
            listed.stdout,
            "alice\nbob  produce=\"orders-*\" consume=\"\"\n"
        );
        let stored = pg.psql("admin", "SELECT hash FROM users WHERE name = 'alice'");
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(!stored.contains("pw-two"), "{stored}");
        let removed = cli(&["user", "remove", "alice"], None).ok();
        assert_eq!(removed.stdout, "removed user 'alice'\n");
        cli(&["user", "remove", "alice"], None).fails(1, "no user named 'alice'");
        assert_eq!(cli(&["user", "list"], None).ok().stdout.lines().count(), 1);

        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("copy.db");
        let target = target.to_str().unwrap();
        cli(&["backup", target], None).fails(2, "pg_dump");
        assert!(
            !std::path::Path::new(target).exists(),
            "backup wrote {target}"
        );
        assert!(
            url.contains(&secret.replace(' ', "%20")),
            "the URL has a password"
        );
    }

    /// The `stream` and `consumer` commands on PostgreSQL print what they print on SQLite
    /// for the same events and offsets, and refuse what they refuse there.
    #[test]
    fn stream_and_consumer_commands_run_on_postgres() {
        let test = "stream_and_consumer_commands_run_on_postgres";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("streams");
        let mut db = Database::open(&url).unwrap();
        let placed: Vec<Payload> = (0..3)
            .map(|_| Payload::Element {
                name: "placed".into(),
                fields: ",\"event\":{}".into(),
            })
            .collect();
        let ids = ids_of(&mut db, "orders", Some("shop"), &placed);
        ids_of(&mut db, "audit", None, &[Payload::Data("1".into())]);
        let ack = Ack {
            stream: "orders",
            consumer: "billing",
            id: ids[0],
        };
        assert_eq!(db.ack(&[ack]).unwrap(), [true]);
        let cli = |args: &[&str]| {
            let mut args = args.to_vec();
            args.extend(["--db", &url]);
            run(&args, &[], None)
        };
        let listed = cli(&["stream", "list"]).ok().stdout;
        let rows: Vec<Vec<&str>> = listed
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[1], ["audit", "-", "1", "1", "1"], "{listed}");
        assert_eq!(rows[2], ["orders", "shop", "3", "3", "1"], "{listed}");
        assert_eq!(rows.len(), 3, "{listed}");
        let shown = cli(&["stream", "show", "orders"]).ok().stdout;
        assert_eq!(
            shown,
            "stream:      orders\nowner:       shop\nevents:      3\nlast seq:    3\n\
             first event: 1 ms\nlast event:  1 ms\nconsumers:\n  billing placed offset=1 lag=2\n"
        );
        cli(&["stream", "show", "nope"]).fails(1, "no stream named 'nope'");
        let reset = cli(&["consumer", "reset", "orders", "billing", "placed", "2"]).ok();
        assert_eq!(
            reset.stdout,
            "consumer 'billing' of 'orders' (placed) now at offset 2\n"
        );
        let past = ["consumer", "reset", "orders", "billing", "placed", "4"];
        cli(&past).fails(2, "offset 4 is past the stream's newest event (3)");
        let unknown = ["consumer", "reset", "nope", "billing", "placed", "0"];
        cli(&unknown).fails(2, "no stream named 'nope'");
        let released = cli(&["stream", "release", "orders"]).ok();
        assert!(released.stdout.starts_with("released stream 'orders'"));
        cli(&["stream", "release", "nope"]).fails(1, "no stream named 'nope'");
        let shown = cli(&["stream", "show", "orders"]).ok().stdout;
        assert!(shown.contains("owner:       -\n"), "{shown}");
        assert!(
            shown.ends_with("billing placed offset=2 lag=1\n"),
            "{shown}"
        );
        let removed = cli(&["consumer", "remove", "orders", "billing"]).ok();
        assert_eq!(
            removed.stdout,
            "removed consumer 'billing' of 'orders': retention no longer waits for it\n"
        );
        cli(&["consumer", "remove", "orders", "billing"]).fails(1, "no consumer named 'billing'");
        cli(&["consumer", "remove", "nope", "billing"]).fails(2, "no stream named 'nope'");
        let shown = cli(&["stream", "show", "orders"]).ok().stdout;
        assert!(shown.ends_with("consumers:\n"), "{shown}");
    }
}

/// The status page's and metrics' reads, retention and the cross-node wake-up on
/// PostgreSQL, each against a throwaway cluster.
#[cfg(feature = "postgres")]
mod node {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use eventserver::Start;
    use eventserver::pg::{
        Ack, Append, Database, Listener, Outcome, Payload, RETENTION_LOCK, Retention, Sweep,
    };

    use crate::support::Postgres;

    /// Appends one event named `name` (a `/publish` event for `None`) to each of
    /// `streams`, in one batch stamped `ts`; returns the events' ids.
    fn append(db: &mut Database, streams: &[&str], name: Option<&str>, ts: u64) -> Vec<uuid::Uuid> {
        let payload = match name {
            Some(name) => Payload::Element {
                name: name.into(),
                fields: ",\"event\":{}".into(),
            },
            None => Payload::Data("{}".into()),
        };
        let appends: Vec<Append> = streams
            .iter()
            .map(|stream| Append {
                stream,
                producer: None,
                payload: &payload,
            })
            .collect();
        db.append(&appends, ts)
            .unwrap()
            .into_iter()
            .map(|outcome| match outcome {
                Outcome::Stored(event) => event.id,
                Outcome::Locked => panic!("{streams:?}: locked"),
            })
            .collect()
    }

    /// `consumer` acknowledges event `id` of `stream`.
    fn ack(db: &mut Database, stream: &str, consumer: &str, id: uuid::Uuid) {
        let ack = Ack {
            stream,
            consumer,
            id,
        };
        assert_eq!(
            db.ack(&[ack]).unwrap(),
            [true],
            "{stream}: {consumer}'s ACK"
        );
    }

    /// Consumer lag, retention's held counts, the status page's overview (names in
    /// bytewise order, hidden streams skipped, both limits) and the newest timestamp answer
    /// as SQLite's reader does.
    #[test]
    fn the_status_and_metrics_reads_answer_as_sqlites_do() {
        let test = "the_status_and_metrics_reads_answer_as_sqlites_do";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        // A database whose own collation (ICU's English) sorts "a" before "B".
        pg.psql(
            "postgres",
            "CREATE DATABASE status TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en'",
        );
        assert_eq!(
            pg.psql(
                "status",
                "SELECT string_agg(n, '') FROM (SELECT unnest(ARRAY['B', 'a']) ORDER BY 1) v (n)"
            ),
            "aB"
        );
        let mut db = Database::open(&pg.url("status")).unwrap();
        assert_eq!(db.newest_timestamp().unwrap(), 0);
        let overview = db.overview(|_| true, 10, 10).unwrap();
        assert!(overview.streams.is_empty() && !overview.more_streams);
        assert!(db.consumer_lag().unwrap().is_empty());

        // Bytewise, "B" sorts before "a"; a locale would put it after.
        let streams = ["a", "B", "hidden", "z"];
        let placed = append(&mut db, &streams, Some("placed"), 20);
        append(&mut db, &streams, Some("placed"), 30);
        append(&mut db, &["a", "B"], Some("paid"), 25);
        append(&mut db, &["a"], None, 10);
        ack(&mut db, "a", "billing", placed[0]);
        ack(&mut db, "a", "audit", placed[0]);
        ack(&mut db, "B", "billing", placed[1]);
        assert_eq!(
            db.newest_timestamp().unwrap(),
            30,
            "the newest time of any stream, whatever the order of the batches"
        );

        let lag = db.consumer_lag().unwrap();
        let lag: Vec<(&str, &str, &str, u64)> = lag
            .iter()
            .map(|(s, c, n, lag)| (&**s, &**c, &**n, *lag))
            .collect();
        assert_eq!(
            lag,
            [
                ("B", "billing", "placed", 1),
                ("a", "audit", "placed", 1),
                ("a", "billing", "placed", 1),
            ]
        );

        let visible = |name: &str| name != "hidden";
        let all = db.overview(visible, 10, 10).unwrap();
        let listed: Vec<(&str, u64, u64, u64, usize)> = all
            .streams
            .iter()
            .map(|s| {
                let sum = &s.summary;
                (
                    &*sum.name,
                    sum.events,
                    sum.last_seq,
                    sum.last_ms,
                    s.consumers.len(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            [("B", 3, 3, 30, 1), ("a", 4, 4, 30, 2), ("z", 2, 2, 30, 0)]
        );
        assert!(!all.more_streams && !all.more_consumers);
        let a = &all.streams[1].consumers;
        let a: Vec<(&str, &str, u64, u64)> = a
            .iter()
            .map(|c| (&*c.consumer, &*c.event_name, c.offset, c.lag))
            .collect();
        assert_eq!(a, [("audit", "placed", 1, 1), ("billing", "placed", 1, 1)]);

        let first = db.overview(visible, 2, 3).unwrap();
        let names: Vec<&str> = first.streams.iter().map(|s| &*s.summary.name).collect();
        assert_eq!(names, ["B", "a"]);
        assert!(first.more_streams, "z was left out");
        assert!(!first.more_consumers, "three consumers in all fit");
        let fewer = db.overview(visible, 10, 2).unwrap();
        let counts: Vec<usize> = fewer.streams.iter().map(|s| s.consumers.len()).collect();
        assert_eq!(counts, [1, 1, 0]);
        assert!(fewer.more_consumers && !fewer.more_streams);
        // Past a page of the walk: the names beyond it are still found, in order.
        let many: Vec<String> = (0..300).map(|i| format!("m{i:03}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        append(&mut db, &many, None, 40);
        let late = db.overview(|name| name >= "m250", 100, 0).unwrap();
        assert_eq!(late.streams.len(), 51, "m250..m299 and z");
        assert_eq!(late.streams[50].summary.name, "z");

        assert!(db.retention_held().unwrap().is_empty());
        pg.psql(
            "status",
            "INSERT INTO retention_held (stream_id, consumer, events) \
             SELECT id, c, n FROM streams, (VALUES ('x', 2), ('W', 5)) v (c, n) \
             WHERE name IN ('a', 'B')",
        );
        let held = db.retention_held().unwrap();
        let held: Vec<(&str, &str, u64)> = held.iter().map(|(s, c, n)| (&**s, &**c, *n)).collect();
        assert_eq!(
            held,
            [("B", "W", 5), ("B", "x", 2), ("a", "W", 5), ("a", "x", 2)]
        );
    }

    /// How long a notification may take to arrive: far more than it ever does.
    const HEARD_WITHIN: Duration = Duration::from_secs(10);

    /// What `listener` hears until `enough` holds of it, the newest sequence number per
    /// stream, failing the test if that takes longer than [`HEARD_WITHIN`]. Each wake-up
    /// names a stream at most once.
    fn hear(
        listener: &mut Listener,
        enough: impl Fn(&HashMap<String, u64>) -> bool,
    ) -> HashMap<String, u64> {
        let deadline = Instant::now() + HEARD_WITHIN;
        let mut heard = HashMap::new();
        while !enough(&heard) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "heard only {heard:?}");
            let woken = listener.wait(left).unwrap();
            let mut streams: Vec<&str> = woken.iter().map(|(s, _)| &**s).collect();
            streams.sort_unstable();
            streams.dedup();
            assert_eq!(streams.len(), woken.len(), "a stream twice: {woken:?}");
            for (stream, seq) in woken {
                let newest = heard.entry(stream).or_default();
                assert!(seq > *newest, "a wake-up went back: {seq} after {newest}");
                *newest = seq;
            }
        }
        heard
    }

    /// An append through one node wakes another node's listener with each stream it
    /// appended to and that stream's newest sequence number; nothing is heard of a
    /// transaction before it commits, nor of one rolled back.
    #[test]
    fn a_notification_carries_the_stream_and_its_newest_seq_after_the_commit() {
        let test = "a_notification_carries_the_stream_and_its_newest_seq_after_the_commit";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("wake");
        let mut db = Database::open(&url).unwrap();
        let mut listener = Listener::connect(&url).unwrap();
        append(&mut db, &["orders"], Some("placed"), 1);
        append(&mut db, &["orders", "audit"], None, 2);
        let heard = hear(&mut listener, |h| h.len() == 2 && h["orders"] == 2);
        assert_eq!(heard["audit"], 1);

        // Another connection's transaction, announcing as an append does.
        let mut other = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let mut tx = other.transaction().unwrap();
        tx.execute("SELECT pg_notify('eventserver', '7 orders')", &[])
            .unwrap();
        let early = listener.wait(Duration::from_millis(300)).unwrap();
        assert!(early.is_empty(), "heard before the commit: {early:?}");
        tx.rollback().unwrap();
        let mut tx = other.transaction().unwrap();
        tx.execute("SELECT pg_notify('eventserver', '9 orders')", &[])
            .unwrap();
        tx.commit().unwrap();
        // The rolled-back 7 never arrives; the committed 9 does.
        let heard = hear(&mut listener, |h| !h.is_empty());
        assert_eq!(heard, HashMap::from([("orders".to_owned(), 9)]));
    }

    /// A batch of several appends to one stream wakes a listener once for it, with the
    /// newest sequence number, and a listener that hears several batches at once names
    /// each stream once.
    #[test]
    fn appends_to_one_stream_in_one_batch_wake_once_with_the_highest_seq() {
        let test = "appends_to_one_stream_in_one_batch_wake_once_with_the_highest_seq";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("batch");
        let mut db = Database::open(&url).unwrap();
        let mut listener = Listener::connect(&url).unwrap();
        append(&mut db, &["orders"; 5], Some("placed"), 1);
        let heard = listener.wait(HEARD_WITHIN).unwrap();
        assert_eq!(
            heard,
            [("orders".to_owned(), 5)],
            "one wake-up at the newest"
        );
        for _ in 0..20 {
            append(&mut db, &["orders", "audit", "orders"], None, 2);
        }
        // However the 20 batches' notifications fall into wake-ups, no wake-up names a
        // stream twice, none goes back, and the last are the newest.
        let newest =
            |h: &HashMap<String, u64>| h.get("orders") == Some(&45) && h.get("audit") == Some(&20);
        assert_eq!(hear(&mut listener, newest).len(), 2);
    }

    /// Stream names travel as they are, spaces, digits and any UTF-8 included, up to the
    /// longest name the APIs accept (1,024 bytes).
    #[test]
    fn a_stream_name_with_spaces_and_unicode_round_trips() {
        let test = "a_stream_name_with_spaces_and_unicode_round_trips";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("names");
        let mut db = Database::open(&url).unwrap();
        let mut listener = Listener::connect(&url).unwrap();
        let longest = "\u{e9}".repeat(512);
        assert_eq!(longest.len(), 1024);
        let names = ["caf\u{e9} au lait \u{1F600}", "12 34 ", " ", &longest];
        append(&mut db, &names, None, 1);
        let heard = hear(&mut listener, |h| h.len() == names.len());
        for name in names {
            assert_eq!(heard.get(name), Some(&1), "{name:?} in {heard:?}");
        }
    }

    /// Connects a listener and a node to `url`, trying again while the server recovers
    /// from a crash of one of its backends.
    fn reconnect(url: &str) -> (Listener, Database) {
        let deadline = Instant::now() + HEARD_WITHIN;
        loop {
            match Listener::connect(url).and_then(|l| Ok((l, Database::open(url)?))) {
                Ok(both) => return both,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("reconnecting: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("the server did not come back: {e}"),
            }
        }
    }

    /// A listener whose server-side backend ends answers its wait with an error at once,
    /// rather than waiting out the timeout (or forever), whether the server says why
    /// (`pg_terminate_backend`) or the connection just ends (the backend killed); a new
    /// listener hears again.
    #[test]
    fn a_listener_whose_backend_is_gone_returns_an_error() {
        let test = "a_listener_whose_backend_is_gone_returns_an_error";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("gone");
        let listening = "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %'";
        let mut listener = Listener::connect(&url).unwrap();
        for (seq, how) in (1..).zip(["terminated", "killed"]) {
            let pid = pg.psql("gone", listening);
            if how == "terminated" {
                let sql = format!("SELECT pg_terminate_backend({pid})");
                assert_eq!(pg.psql("gone", &sql), "t");
            } else {
                let killed = std::process::Command::new("kill")
                    .args(["-KILL", &pid])
                    .status()
                    .unwrap();
                assert!(killed.success());
            }
            let started = Instant::now();
            let lost = listener.wait(Duration::from_secs(60));
            assert!(lost.is_err(), "{how}: {lost:?}");
            assert!(
                started.elapsed() < HEARD_WITHIN,
                "{how}: {:?}",
                started.elapsed()
            );
            // A killed backend takes the others with it: the server restarts them all.
            let (new, mut db) = reconnect(&url);
            listener = new;
            append(&mut db, &["orders"], None, 1);
            let heard = hear(&mut listener, |h| !h.is_empty());
            assert_eq!(heard, HashMap::from([("orders".to_owned(), seq)]), "{how}");
        }
    }

    /// The sequence numbers of the events `stream` holds, oldest first.
    fn seqs(db: &mut Database, stream: &str) -> Vec<u64> {
        let view = db.since(stream, &Start::After(0), None, 100_000).unwrap();
        view.events.iter().map(|e| e.seq).collect()
    }

    /// Runs a retention run of `limits` through `db` to its end, at `now_ms`; returns how
    /// many chunks it took.
    fn retain(db: &mut Database, limits: Retention, now_ms: u64) -> usize {
        let mut sweep = Sweep::new(limits);
        let mut chunks = 1;
        while db.retain(&mut sweep, now_ms).unwrap() {
            chunks += 1;
        }
        chunks
    }

    /// Retention by count keeps each stream's newest events; by age, those not older than
    /// the limit (an event exactly that old stays). Deleting every event of a stream never
    /// gives a sequence number twice, nor moves the newest time back.
    #[test]
    fn retention_keeps_the_newest_by_count_and_by_age() {
        let test = "retention_keeps_the_newest_by_count_and_by_age";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let mut db = Database::open(&pg.database("retain")).unwrap();
        for ts in [1000, 2000, 3000] {
            append(&mut db, &["a"; 3], None, ts);
        }
        append(&mut db, &["b"; 2], None, 1000);
        append(&mut db, &["c"], None, 3000);
        let limits = |max_events, max_age_ms| Retention {
            max_events,
            max_age_ms,
            acked_only: false,
        };
        retain(&mut db, limits(Some(4), None), 3000);
        assert_eq!(seqs(&mut db, "a"), [6, 7, 8, 9]);
        assert_eq!(seqs(&mut db, "b"), [1, 2]);
        assert_eq!(seqs(&mut db, "c"), [1]);
        // Older than 2000 ms: b's events; a's sixth is exactly that old and stays.
        retain(&mut db, limits(None, Some(1000)), 3000);
        assert_eq!(seqs(&mut db, "a"), [6, 7, 8, 9]);
        assert!(seqs(&mut db, "b").is_empty());
        assert_eq!(seqs(&mut db, "c"), [1]);
        // Both limits: whichever reaches further.
        retain(&mut db, limits(Some(2), Some(1000)), 3001);
        assert_eq!(seqs(&mut db, "a"), [8, 9]);
        retain(&mut db, limits(Some(100), Some(1000)), 3001);
        assert_eq!(seqs(&mut db, "a"), [8, 9], "nothing else is that old");

        retain(&mut db, limits(None, Some(1000)), 10_000);
        for stream in ["a", "b", "c"] {
            assert!(seqs(&mut db, stream).is_empty(), "{stream}");
        }
        assert_eq!(db.newest_timestamp().unwrap(), 3000);
        append(&mut db, &["a", "b"], None, 1);
        assert_eq!(seqs(&mut db, "a"), [10]);
        assert_eq!(seqs(&mut db, "b"), [3]);
    }

    /// With `acked_only`, an event past the limits stays while a consumer known on its
    /// stream has not acknowledged it; events of names nobody acknowledged, and `/publish`
    /// events, go. What each consumer holds back is counted, and rewritten by every run.
    #[test]
    fn interest_retention_keeps_what_a_known_consumer_has_not_acknowledged() {
        let test = "interest_retention_keeps_what_a_known_consumer_has_not_acknowledged";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let mut db = Database::open(&pg.database("interest")).unwrap();
        // Seqs 1, 4, 7, 10 placed; 2, 5, 8, 11 paid; 3, 6, 9, 12 published.
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.extend(append(&mut db, &["orders"], Some("placed"), 1));
            ids.extend(append(&mut db, &["orders"], Some("paid"), 1));
            ids.extend(append(&mut db, &["orders"], None, 1));
        }
        append(&mut db, &["quiet"; 5], Some("placed"), 1);
        ack(&mut db, "orders", "billing", ids[3]);
        ack(&mut db, "orders", "audit", ids[1]);
        let interest = Retention {
            max_events: Some(3),
            max_age_ms: None,
            acked_only: true,
        };
        retain(&mut db, interest, 1);
        // Up to seq 9: billing holds placed 7, audit paid 5 and 8.
        assert_eq!(seqs(&mut db, "orders"), [5, 7, 8, 10, 11, 12]);
        assert_eq!(seqs(&mut db, "quiet"), [3, 4, 5], "nobody's interest");
        let held = |db: &mut Database| {
            let held = db.retention_held().unwrap();
            held.iter()
                .map(|(s, c, n)| format!("{s} {c} {n}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(held(&mut db), ["orders audit 2", "orders billing 1"]);
        retain(&mut db, interest, 1);
        assert_eq!(
            held(&mut db),
            ["orders audit 2", "orders billing 1"],
            "not added up"
        );

        ack(&mut db, "orders", "billing", ids[6]);
        retain(&mut db, interest, 1);
        assert_eq!(seqs(&mut db, "orders"), [5, 8, 10, 11, 12]);
        assert_eq!(held(&mut db), ["orders audit 2"]);
        ack(&mut db, "orders", "audit", ids[7]);
        retain(&mut db, interest, 1);
        assert_eq!(seqs(&mut db, "orders"), [10, 11, 12]);
        assert!(held(&mut db).is_empty(), "{:?}", held(&mut db));

        pg.psql(
            "interest",
            "INSERT INTO retention_held SELECT id, 'gone', 7 FROM streams",
        );
        let plain = Retention {
            acked_only: false,
            ..interest
        };
        retain(&mut db, plain, 1);
        assert!(
            held(&mut db).is_empty(),
            "a run without interest holds nothing"
        );
    }

    /// A backlog of thousands of events past the limits goes in chunks of at most 2,000
    /// events each, whose counts of what a consumer holds back add up over the chunks, and
    /// another node appends between them.
    #[test]
    fn a_large_backlog_is_trimmed_in_bounded_chunks() {
        let test = "a_large_backlog_is_trimmed_in_bounded_chunks";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("backlog");
        let mut db = Database::open(&url).unwrap();
        let mut ids = Vec::new();
        for _ in 0..10 {
            ids.extend(append(&mut db, &["big"; 500], Some("placed"), 1));
        }
        append(&mut db, &["small"; 10], Some("placed"), 1);
        ack(&mut db, "big", "billing", ids[999]);
        let count = || -> u64 {
            pg.psql("backlog", "SELECT count(*) FROM events")
                .parse()
                .unwrap()
        };
        let mut other = Database::open(&url).unwrap();
        let mut chunks = Vec::new();
        for acked_only in [true, false] {
            let mut sweep = Sweep::new(Retention {
                max_events: Some(100),
                max_age_ms: None,
                acked_only,
            });
            let mut before = count();
            let mut more = true;
            while more {
                more = db.retain(&mut sweep, 1).unwrap();
                let after = count();
                assert!(before - after <= 2_000, "{} in one chunk", before - after);
                before = after;
                if acked_only && chunks.is_empty() {
                    append(&mut other, &["big"; 100], Some("placed"), 1);
                    before += 100;
                }
                chunks.push(acked_only);
            }
            if acked_only {
                // The run's cutoff was 4,900: billing holds 1,001..=4,900.
                assert_eq!(seqs(&mut db, "big").len(), 3_900 + 200);
                let held = db.retention_held().unwrap();
                assert_eq!(held, [("big".into(), "billing".into(), 3_900)]);
            }
        }
        assert!(chunks.iter().filter(|a| **a).count() >= 2, "{chunks:?}");
        assert!(chunks.iter().filter(|a| !**a).count() >= 2, "{chunks:?}");
        assert_eq!(seqs(&mut db, "big"), (5_001..=5_100).collect::<Vec<_>>());
        assert_eq!(seqs(&mut db, "small").len(), 10);
        assert!(db.retention_held().unwrap().is_empty());
    }

    /// Nodes running retention at once never delete past the limits, nor count what a
    /// consumer holds back twice: two runs taking turns chunk by chunk, then two racing
    /// (where one usually finds the lock taken and skips).
    #[test]
    fn two_nodes_retaining_at_once_keep_the_limits() {
        let test = "two_nodes_retaining_at_once_keep_the_limits";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("both");
        let mut db = Database::open(&url).unwrap();
        let streams = ["s0", "s1", "s2", "s3"];
        // The newest event of each batch.
        let mut newest_ids = Vec::new();
        let limits = Retention {
            max_events: Some(1_000),
            max_age_ms: None,
            acked_only: true,
        };
        for round in 0..3 {
            for stream in streams {
                for _ in 0..4 {
                    let ids = append(&mut db, &[stream; 500], Some("placed"), 1);
                    newest_ids.push(ids[499]);
                }
            }
            if round == 0 {
                ack(&mut db, "s0", "billing", newest_ids[1]);
            }
            let chunks = match round {
                // Two runs taking turns chunk by chunk, each starting where the other is.
                0 | 1 => {
                    let mut other = Database::open(&url).unwrap();
                    let (mut a, mut b) = (Sweep::new(limits), Sweep::new(limits));
                    let mut chunks = vec![0, 0];
                    let (mut more_a, mut more_b) = (true, true);
                    while more_a || more_b {
                        if more_a {
                            more_a = db.retain(&mut a, 1).unwrap();
                            chunks[0] += 1;
                        }
                        if more_b {
                            more_b = other.retain(&mut b, 1).unwrap();
                            chunks[1] += 1;
                        }
                    }
                    assert!(chunks.iter().all(|c| *c > 1), "{chunks:?}");
                    chunks
                }
                // Two runs racing.
                _ => {
                    let start = std::sync::Barrier::new(2);
                    std::thread::scope(|s| {
                        let nodes: Vec<_> = (0..2)
                            .map(|_| {
                                s.spawn(|| {
                                    let mut db = Database::open(&url).unwrap();
                                    start.wait();
                                    retain(&mut db, limits, 1)
                                })
                            })
                            .collect();
                        nodes.into_iter().map(|n| n.join().unwrap()).collect()
                    })
                }
            };
            let newest = 2_000 * (round + 1);
            for stream in &streams[1..] {
                let want: Vec<u64> = (newest - 999..=newest).collect();
                assert_eq!(seqs(&mut db, stream), want, "round {round}, {chunks:?}");
            }
            // billing acknowledged s0 up to 1,000: it holds 1,001 up to the cutoff.
            let held = newest - 1_000 - 1_000;
            assert_eq!(seqs(&mut db, "s0").len() as u64, held + 1_000);
            let counted = db.retention_held().unwrap();
            let want = [("s0".into(), "billing".into(), held)];
            assert_eq!(counted, want[..(held > 0) as usize], "{chunks:?}");
        }
    }

    /// While another session holds the retention lock, a node's run stops at once and
    /// deletes nothing; once it is let go, the next run deletes.
    #[test]
    fn a_node_skips_retention_while_another_holds_the_lock() {
        let test = "a_node_skips_retention_while_another_holds_the_lock";
        let Some(pg) = Postgres::start_or_skip(test) else {
            return;
        };
        let url = pg.database("skip");
        let mut db = Database::open(&url).unwrap();
        append(&mut db, &["a"; 10], None, 1);
        let limits = Retention {
            max_events: Some(1),
            max_age_ms: None,
            acked_only: false,
        };
        let mut operator = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        operator
            .execute("SELECT pg_advisory_lock($1)", &[&RETENTION_LOCK])
            .unwrap();
        let mut sweep = Sweep::new(limits);
        assert!(!db.retain(&mut sweep, 1).unwrap(), "the run goes on");
        assert_eq!(seqs(&mut db, "a").len(), 10);
        operator
            .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
            .unwrap();
        assert!(!db.retain(&mut sweep, 1).unwrap(), "a skipped run is over");
        assert_eq!(seqs(&mut db, "a").len(), 10);
        retain(&mut db, limits, 1);
        assert_eq!(seqs(&mut db, "a"), [10]);
    }
}
