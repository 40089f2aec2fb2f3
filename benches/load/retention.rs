//! The **retention** scenario: retention turned on over a large database while producers
//! publish. `--retain-events 1000` is added to a server holding 1,000,000 events (64
//! categories of 15,625), so its first run deletes 936,000 of them; the producers'
//! latency during that catch-up is compared with the same publishing on the same database
//! without retention, and the time until every category is down to its limit is reported.
//!
//! The database is built directly with SQLite, not through the server: one transaction of
//! `INSERT … SELECT` over a counter, with the rows a server would write (sequence numbers,
//! time-ordered ids, `last_seq`), which takes seconds where a million durable publishes
//! would take a minute. Then, on the same file, an in-process server without retention
//! takes `--conns` (one value, 64 by default) connections publishing to those categories for `--duration` (10 s),
//! and is stopped; then one with `--retain-events 1000` takes the same load from its start,
//! its first retention run starting with it (so it also trims what the first phase
//! published), while this thread polls the database (every
//! 20 ms, one index lookup per category) for the moment the backlog is gone: every
//! category's oldest event is one of the newest 1,000 it had when the server started.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::engine::{self, Options};
use crate::publish::Appender;
use crate::report::{self, Latency, cell_ms};
use crate::wire::Site;
use crate::{Api, Opts};

/// Events in the database before retention is turned on.
const EVENTS: i64 = 1_000_000;
/// Categories they are spread over (and the producers publish to).
const CATEGORIES: i64 = 64;
/// What `--retain-events` keeps per category.
const RETAIN: u64 = 1_000;

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";

/// Runs the retention scenario and prints its table and JSON line.
pub fn run(opts: &Opts) -> Result<(), String> {
    let duration = Duration::from_secs_f64(opts.duration.unwrap_or(10.0));
    // `--conns K` picks the producers' connections; the default list means 64.
    let conns = match opts.conns.as_slice() {
        [k] => *k,
        _ => 64,
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let db = dir.path().join("events.db");
    eventserver::admin::add_user(&db, USER, PASSWORD).map_err(|e| e.to_string())?;
    let built = Instant::now();
    let names = fill(&db).map_err(|e| format!("building the database: {e}"))?;
    let built = built.elapsed();
    eprintln!(
        "load: retention: {EVENTS} events in {CATEGORIES} categories written in {:.1} s",
        built.as_secs_f64()
    );

    let steady = publish(&db, None, &names, conns, duration, |_| {})?;
    let targets = targets(&db)?;
    let mut trimmed = None;
    let catch_up = publish(&db, Some(RETAIN), &names, conns, duration, |started| {
        let until = started + duration + Duration::from_secs(120);
        trimmed = wait_trimmed(&db, &targets, started, until);
    })?;

    let mut rows = Vec::new();
    let mut json_runs = Vec::new();
    for (phase, mut app) in [("steady", steady), ("catch-up", catch_up)] {
        let lat = Latency::of(&mut app.lat);
        rows.push(vec![
            phase.to_owned(),
            conns.to_string(),
            format!("{:.0}", app.rate()),
            cell_ms(lat.p50),
            cell_ms(lat.p99),
            cell_ms(lat.max),
            app.ok.to_string(),
            app.errors().to_string(),
        ]);
        json_runs.push(json!({
            "phase": phase,
            "events_per_s": app.rate().round(),
            "ok": app.ok,
            "errors": app.errors(),
            "latency": lat.json(),
        }));
    }
    report::table(
        &format!(
            "retention catch-up (in-process server, {EVENTS} events, keep {RETAIN} per category)"
        ),
        &[
            "phase", "conns", "events/s", "p50 ms", "p99 ms", "max ms", "ok", "errors",
        ],
        &rows,
    );
    let trim_s = trimmed.map(|t| t.as_secs_f64());
    report::note(&match trim_s {
        Some(s) => format!(
            "the backlog was gone (each category down to the {RETAIN} newest at start) \
             {s:.1} s after the server started"
        ),
        None => "not trimmed within the wait".to_owned(),
    });
    report::note(&format!(
        "database built by direct SQLite inserts in {:.1} s",
        built.as_secs_f64()
    ));
    report::json_line(json!({
        "scenario": "retention",
        "target": "in-process",
        "events": EVENTS,
        "retain_events": RETAIN,
        "duration_s": duration.as_secs_f64(),
        "runs": json_runs,
        "trimmed_after_s": trim_s,
    }));
    Ok(())
}

/// Writes [`EVENTS`] events over [`CATEGORIES`] categories into the (new) database; returns
/// the categories' names.
fn fill(db: &Path) -> Result<Vec<String>, rusqlite::Error> {
    let mut conn = rusqlite::Connection::open(db)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let per = EVENTS / CATEGORIES;
    let tx = conn.transaction()?;
    let names: Vec<String> = (0..CATEGORIES).map(|i| format!("retain-{i}")).collect();
    for name in &names {
        tx.execute(
            "INSERT INTO streams (name, last_seq, last_ms, created_ms) VALUES (?1, ?2, ?3, ?3)",
            rusqlite::params![name, per, now_ms],
        )?;
    }
    // Events in commit order (gid), categories interleaved as producers would write them;
    // ids increase like the server's time-ordered ones.
    tx.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 - 1) \
         INSERT INTO events (stream_id, seq, id, ts, data) \
         SELECT s.id, n.i / ?2 + 1, CAST(printf('%016d', n.i) AS BLOB), ?3, \
                '{\"n\":' || n.i || ',\"pad\":\"' || hex(zeroblob(40)) || '\"}' \
         FROM n JOIN streams s ON s.id = n.i % ?2 + 1",
        rusqlite::params![EVENTS, CATEGORIES, now_ms],
    )?;
    tx.commit()?;
    Ok(names)
}

/// Starts a server on `db` (retaining `retain` events per category, if set), has `conns`
/// connections publish to `names` for `duration` while `meanwhile` runs on this thread
/// (given the server's start), and stops the server.
fn publish(
    db: &Path,
    retain: Option<u64>,
    names: &[String],
    conns: usize,
    duration: Duration,
    meanwhile: impl FnOnce(Instant),
) -> Result<Appender, String> {
    let mut config = eventserver::Config::new(db);
    config.listen = "127.0.0.1:0".parse().expect("a loopback address");
    config.retain_events = retain;
    let started = Instant::now();
    let server = eventserver::Server::start(config).map_err(|e| e.to_string())?;
    let site = Site::new(server.addr(), USER, PASSWORD);
    let mut app = Appender::new(&site, Api::Publish, names, conns, Some(duration), None);
    let mut eo = Options::new(Instant::now() + duration + Duration::from_secs(60));
    eo.connect_all_first = true;
    std::thread::scope(|s| {
        s.spawn(|| engine::run(std::slice::from_ref(&site.addr), conns, &mut app, &eo));
        meanwhile(started);
    });
    server.shutdown();
    Ok(app)
}

/// Each category's oldest sequence number that retention keeps, given how far it has
/// been written now: what a run that starts now must delete everything below.
fn targets(db: &Path) -> Result<Vec<(i64, i64)>, String> {
    let conn = rusqlite::Connection::open(db).map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("SELECT id, last_seq - ?1 + 1 FROM streams")
        .map_err(|e| e.to_string())?;
    stmt.query_map([RETAIN as i64], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(|rows| rows.collect())
        .map_err(|e| e.to_string())
}

/// Polls until every category's oldest event is at its target (the backlog there when
/// the server started is gone), or `until`; how long after `started` that was.
fn wait_trimmed(
    db: &Path,
    targets: &[(i64, i64)],
    started: Instant,
    until: Instant,
) -> Option<Duration> {
    let conn = rusqlite::Connection::open(db).ok()?;
    let mut oldest = conn
        .prepare("SELECT seq FROM events WHERE stream_id = ?1 ORDER BY seq LIMIT 1")
        .ok()?;
    while Instant::now() < until {
        let mut done = true;
        for (id, target) in targets {
            let seq: i64 = oldest.query_row([id], |r| r.get(0)).ok()?;
            done &= seq >= *target;
        }
        if done {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
