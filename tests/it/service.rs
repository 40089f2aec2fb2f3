//! Running it as a service, against the real `eventserver` binary: subcommands,
//! every flag/environment pair of `serve`, the first-start admin password, systemd's notify
//! protocol, watchdog and socket activation, graceful shutdown on SIGTERM, `/healthz` in both
//! states and a parsed `/metrics` scrape after known traffic.
//!
//! Every test gets its own temporary database and a port the kernel picks (`--listen
//! 127.0.0.1:0`, read back from the `listening on ADDR` log line). Children are killed when
//! a test fails ([`Proc`]'s `Drop`), and every wait has a deadline.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    BIN, Finished, PASSWORD, Proc, Req, Resp, SHUTDOWN, START, USER, ack_req, append_ok,
    append_req, authed, basic, clean, consume_req, db_with_user, event, events_path, eventserver,
    publish_ok, publish_req, run, send, serve, serve_args, subscribe_req, try_send, wait_until,
};

const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// Runs an admin command on `db`.
#[track_caller]
fn admin(db: &Path, args: &[&str]) -> Finished {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--db", db.to_str().unwrap()]);
    run(&all, &[], None)
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// Appends an event named `name` to `stream` as `producer`.
fn append(addr: SocketAddr, stream: &str, producer: &str, name: &str) -> Resp {
    append_req(addr, stream, producer, &event(name)).send()
}

/// Reads `name` events of `stream` after `consumer`'s offset.
#[track_caller]
fn consume(addr: SocketAddr, stream: &str, consumer: &str, name: &str) -> Vec<Value> {
    let resp = consume_req(
        addr,
        stream,
        consumer,
        &format!("eventName={name}&limit=100"),
    )
    .send();
    assert_eq!(resp.status, 200, "consume: {}", resp.text());
    resp.json().as_array().expect("an array").clone()
}

fn sequences(elements: &[Value]) -> Vec<u64> {
    elements
        .iter()
        .map(|e| e["sequence"].as_u64().expect("a sequence"))
        .collect()
}

#[track_caller]
fn ack(addr: SocketAddr, stream: &str, consumer: &str, id: &str) {
    let resp = ack_req(addr, stream, id, consumer).send();
    assert_eq!(resp.status, 200, "ack: {}", resp.text());
    assert_eq!(resp.json(), json!("OK"));
}

/// The events of a long-poll answer (empty for a timeout answer).
#[track_caller]
fn poll_events(resp: &Resp) -> Vec<Value> {
    assert_eq!(resp.status, 200, "subscribe: {}", resp.text());
    let body = resp.json();
    match body.get("events") {
        Some(events) => events.as_array().expect("events array").clone(),
        None => {
            assert!(
                body.get("timeout").is_some(),
                "neither events nor timeout: {body}"
            );
            Vec::new()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------

/// Samples of a Prometheus text exposition: `name{labels}` → value. Panics on a sample
/// that is not a number or appears twice.
#[track_caller]
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value is not a number: {line:?}"));
        assert!(
            samples.insert(key.to_owned(), value).is_none(),
            "sample {key} appears twice"
        );
    }
    samples
}

#[track_caller]
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let resp = send(addr, authed(addr, "GET", "/metrics"));
    assert_eq!(resp.status, 200, "metrics: {}", resp.text());
    parse_prometheus(&resp.text())
}

#[track_caller]
fn sample(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have {:?}", samples.keys()))
}

/// Waits until `n` long-polls are parked.
#[track_caller]
fn wait_parked(addr: SocketAddr, n: usize) {
    wait_until(START, &format!("{n} parked long-polls"), || {
        scrape(addr).get("eventserver_longpoll_parked") == Some(&(n as f64))
    });
}

// ---------------------------------------------------------------------------------------
// systemd notify
// ---------------------------------------------------------------------------------------

/// A notify socket the test owns, like systemd's.
struct Notify {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Notify {
    fn bind(path: &Path) -> Notify {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        Notify {
            sock,
            seen: Vec::new(),
        }
    }

    /// The next datagram, if one arrives within the socket's short read timeout.
    fn recv(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(message.clone());
                Some(message)
            }
            Err(_) => None,
        }
    }

    /// Waits for a datagram with the line `line`, returning the whole datagram.
    #[track_caller]
    fn expect(&mut self, line: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(message) = self.recv()
                && message.lines().any(|l| l == line)
            {
                return message;
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} datagram within {within:?}; got {:?}",
                self.seen
            );
        }
    }

    /// Waits until no `WATCHDOG=1` has arrived for `quiet`, failing after `within`.
    #[track_caller]
    fn expect_watchdog_silence(&mut self, quiet: Duration, within: Duration) {
        let mut last = Instant::now();
        let deadline = last + within.max(quiet) + Duration::from_millis(100);
        loop {
            if let Some(message) = self.recv()
                && message.lines().any(|l| l == "WATCHDOG=1")
            {
                last = Instant::now();
            }
            if last.elapsed() >= quiet {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "WATCHDOG=1 kept arriving for {within:?}"
            );
        }
    }
}

/// A server started with `NOTIFY_SOCKET` pointing at a fresh socket in `dir`.
fn serve_notified(dir: &Path, db: &Path, envs: &[(&str, &str)]) -> (Proc, Notify) {
    let path = dir.join("notify.sock");
    let notify = Notify::bind(&path);
    let mut all = vec![("NOTIFY_SOCKET", path.to_str().unwrap())];
    all.extend_from_slice(envs);
    let args = serve_args(db, &[]);
    (Proc::spawn(eventserver(&args, &all), None), notify)
}

// ---------------------------------------------------------------------------------------
// Subcommands
// ---------------------------------------------------------------------------------------

#[test]
fn version_and_help() {
    let version = run(&["--version"], &[], None).ok();
    assert_eq!(
        version.stdout,
        format!("eventserver {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(run(&["-V"], &[], None).ok().stdout, version.stdout);

    let help = run(&["--help"], &[], None).ok();
    assert_eq!(run(&["-h"], &[], None).ok().stdout, help.stdout);
    for needle in [
        "Usage:",
        "user add NAME",
        "user list",
        "user remove NAME",
        "stream list",
        "stream show STREAM",
        "stream release STREAM",
        "consumer reset STREAM CONSUMER EVENT_NAME OFFSET",
        "consumer remove STREAM CONSUMER",
        "backup PATH",
        "--version",
        "EVENTSERVER_",
        "READY",
        "LISTEN_FDS",
    ] {
        assert!(help.stdout.contains(needle), "--help lacks {needle:?}");
    }
    // Every serve flag the help lists is one this file tests as a flag and a variable.
    let covered: Vec<&str> = SETTINGS
        .iter()
        .map(|s| s.flag)
        .chain(["--db", "--public-subscribe", "--public-publish"])
        .collect();
    let serve_options = help
        .stdout
        .split_once("Serve options")
        .expect("a 'Serve options' section")
        .1;
    let listed: Vec<&str> = serve_options
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("--"))
        .collect();
    assert!(listed.len() >= covered.len(), "{listed:?}");
    for flag in &listed {
        assert!(
            covered.contains(flag),
            "{flag} is not covered by these tests"
        );
    }
    for flag in &covered {
        assert!(listed.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn user_add_list_remove() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let db_s = db.to_str().unwrap();

    // The password is the first line of stdin; later lines are ignored, CR LF is trimmed.
    let added = run(
        &["user", "add", "alice", "--db", db_s],
        &[],
        Some("s3cret\nnot the password\n"),
    )
    .ok();
    assert!(
        added.stdout.contains("added user 'alice'"),
        "{}",
        added.stdout
    );
    run(
        &["user", "add", "bob", "--db", db_s],
        &[],
        Some("pw bob\r\n"),
    )
    .ok();
    assert_eq!(admin(&db, &["user", "list"]).ok().stdout, "alice\nbob\n");

    // Adding an existing user replaces the password.
    let replaced = run(&["user", "add", "alice", "--db", db_s], &[], Some("n3w\n")).ok();
    assert!(replaced.stdout.contains("replaced"), "{}", replaced.stdout);
    assert_eq!(admin(&db, &["user", "list"]).ok().stdout, "alice\nbob\n");

    // Refused: empty password, a name with ':'; nothing changes.
    run(&["user", "add", "carol", "--db", db_s], &[], Some("\n")).fails(2, "password");
    run(&["user", "add", "c:d", "--db", db_s], &[], Some("pw\n")).fails(2, "user names");
    assert_eq!(admin(&db, &["user", "list"]).ok().stdout, "alice\nbob\n");

    // The users work against a running server (no password cache, so removal bites at once).
    let (mut server, addr) = serve(&db, &["--auth-cache-secs", "0"], &[]);
    let metrics =
        |user: &str, pw: &str| send(addr, Req::new(addr, "GET", "/metrics").auth(user, pw)).status;
    assert_eq!(metrics("alice", "n3w"), 200);
    assert_eq!(metrics("alice", "s3cret"), 401, "the replaced password");
    assert_eq!(metrics("alice", "not the password"), 401);
    assert_eq!(metrics("bob", "pw bob"), 200);

    // Removal while the server runs.
    let removed = admin(&db, &["user", "remove", "alice"]).ok();
    assert!(removed.stdout.contains("removed user 'alice'"));
    assert_eq!(metrics("alice", "n3w"), 401);
    assert_eq!(metrics("bob", "pw bob"), 200);
    assert_eq!(admin(&db, &["user", "list"]).ok().stdout, "bob\n");

    // Removing an unknown user fails.
    let unknown = admin(&db, &["user", "remove", "alice"]);
    assert!(
        !unknown.status.success(),
        "removing an unknown user succeeded"
    );
    assert!(
        unknown.stderr.contains("no user named 'alice'"),
        "{}",
        unknown.stderr
    );

    // Users existed, so the server created no admin.
    server.stop();
    assert!(!server.stdout().contains("password"), "{}", server.stdout());
    assert_eq!(admin(&db, &["user", "list"]).ok().stdout, "bob\n");
}

/// The `name: value` field of `stream show` output.
#[track_caller]
fn field<'a>(show: &'a str, name: &str) -> &'a str {
    show.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name:?} in:\n{show}"))
        .trim()
}

/// The consumer lines of `stream show` output, trimmed.
fn consumer_lines(show: &str) -> Vec<String> {
    show.lines()
        .skip_while(|l| !l.starts_with("consumers:"))
        .skip(1)
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The `stream list` row of `stream`, split into columns.
#[track_caller]
fn list_row(list: &str, stream: &str) -> Vec<String> {
    list.lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|cols| cols.first().map(String::as_str) == Some(stream))
        .unwrap_or_else(|| panic!("no row for {stream} in:\n{list}"))
}

#[test]
fn stream_list_show_release_and_consumer_reset() {
    let (_dir, db) = db_with_user();
    let (mut server, addr) = serve(&db, &[], &[]);

    let placed: Vec<String> = (0..3)
        .map(|_| append_ok(addr, "orders", "p1", &event("OrderPlaced")))
        .collect();
    append_ok(addr, "orders", "p1", &event("OrderShipped"));
    publish_ok(addr, "news", &json!({"headline": "hi"}));
    assert_eq!(
        sequences(&consume(addr, "orders", "billing", "OrderPlaced")),
        [1, 2, 3]
    );
    ack(addr, "orders", "billing", &placed[1]);
    assert_eq!(
        sequences(&consume(addr, "orders", "billing", "OrderPlaced")),
        [3]
    );
    ack(addr, "orders", "audit", &placed[0]);

    // stream list, while the server runs.
    let list = admin(&db, &["stream", "list"]).ok().stdout;
    assert_eq!(list_row(&list, "orders")[1..4], ["p1", "4", "4"], "{list}");
    assert_eq!(list_row(&list, "news")[1..4], ["-", "1", "1"], "{list}");
    assert_eq!(list.lines().count(), 3, "a header and two streams:\n{list}");

    // stream show: owner, events, times, consumers with offsets and lag.
    let show = admin(&db, &["stream", "show", "orders"]).ok().stdout;
    assert_eq!(field(&show, "stream"), "orders");
    assert_eq!(field(&show, "owner"), "p1");
    assert_eq!(field(&show, "events"), "4");
    assert_eq!(field(&show, "last seq"), "4");
    let ms = |name| -> u64 {
        field(&show, name)
            .trim_end_matches(" ms")
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a time:\n{show}"))
    };
    assert!(ms("first event") > 1_600_000_000_000, "{show}");
    assert!(ms("last event") >= ms("first event"), "{show}");
    assert_eq!(
        consumer_lines(&show),
        [
            "audit OrderPlaced offset=1 lag=2",
            "billing OrderPlaced offset=2 lag=1"
        ],
        "{show}"
    );
    admin(&db, &["stream", "show", "nope"]).fails(1, "no stream named 'nope'");

    // stream release: another producer may then claim the stream.
    assert_eq!(append(addr, "orders", "p2", "OrderPlaced").status, 423);
    let released = admin(&db, &["stream", "release", "orders"]).ok();
    assert!(released.stdout.contains("released stream 'orders'"));
    let p2 = append_ok(addr, "orders", "p2", &event("OrderPlaced"));
    assert_eq!(append(addr, "orders", "p1", "OrderPlaced").status, 423);
    let show = admin(&db, &["stream", "show", "orders"]).ok().stdout;
    assert_eq!(field(&show, "owner"), "p2");
    assert_eq!(field(&show, "events"), "5");
    admin(&db, &["stream", "release", "nope"]).fails(1, "no stream named 'nope'");

    // consumer reset: back, forward, and for a consumer never seen before.
    let reset =
        |stream, consumer, name, to| admin(&db, &["consumer", "reset", stream, consumer, name, to]);
    reset("orders", "billing", "OrderPlaced", "0").ok();
    assert_eq!(
        sequences(&consume(addr, "orders", "billing", "OrderPlaced")),
        [1, 2, 3, 5]
    );
    reset("orders", "billing", "OrderPlaced", "3").ok();
    let after = consume(addr, "orders", "billing", "OrderPlaced");
    assert_eq!(sequences(&after), [5]);
    assert_eq!(after[0]["eventId"], json!(p2));
    reset("orders", "fresh", "OrderShipped", "3").ok();
    assert_eq!(
        sequences(&consume(addr, "orders", "fresh", "OrderShipped")),
        [4]
    );
    let show = admin(&db, &["stream", "show", "orders"]).ok().stdout;
    assert_eq!(
        consumer_lines(&show),
        [
            "audit OrderPlaced offset=1 lag=3",
            "billing OrderPlaced offset=3 lag=1",
            "fresh OrderShipped offset=3 lag=1"
        ],
        "{show}"
    );
    // Refusals name the problem and change nothing.
    reset("orders", "billing", "OrderPlaced", "6").fails(2, "past the stream's newest event");
    reset("orders", "billing", "OrderPlaced", "x").fails(2, "invalid offset");
    reset("nope", "billing", "OrderPlaced", "0").fails(2, "no stream named 'nope'");
    admin(&db, &["consumer", "reset", "orders", "billing"]).fails(2, "usage");
    assert_eq!(
        sequences(&consume(addr, "orders", "billing", "OrderPlaced")),
        [5]
    );

    server.stop();
}

#[test]
fn backup_while_serving_is_a_usable_copy() {
    let (dir, db) = db_with_user();
    let (mut server, addr) = serve(&db, &[], &[]);
    for _ in 0..3 {
        append_ok(addr, "orders", "p1", &event("OrderPlaced"));
    }
    publish_ok(addr, "news", &json!(1));
    publish_ok(addr, "news", &json!(2));

    // Writers keep going while the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, published) = (stop.clone(), published.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n = published.load(Ordering::SeqCst);
                publish_ok(addr, "busy", &json!(n));
                published.store(n + 1, Ordering::SeqCst);
            }
        })
    };
    wait_until(START, "the writer is busy", || {
        published.load(Ordering::SeqCst) >= 5
    });
    let copy = dir.path().join("copy.db");
    let backup = admin(&db, &["backup", copy.to_str().unwrap()]).ok();
    assert!(backup.stdout.contains("backed up"), "{}", backup.stdout);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let written = published.load(Ordering::SeqCst);

    // The copy opens with the eventserver binary itself.
    let list = admin(&copy, &["stream", "list"]).ok().stdout;
    assert_eq!(list_row(&list, "orders")[1..4], ["p1", "3", "3"], "{list}");
    assert_eq!(list_row(&list, "news")[1..3], ["-", "2"], "{list}");
    let busy: u64 = list_row(&list, "busy")[2].parse().unwrap();
    assert!(
        (5..=written).contains(&busy),
        "the copy has {busy} of {written} events"
    );
    assert_eq!(
        admin(&copy, &["user", "list"]).ok().stdout,
        format!("{USER}\n")
    );

    // A backup never overwrites.
    admin(&db, &["backup", copy.to_str().unwrap()]).fails(2, "already exists");
    server.stop();

    // A server runs on the copy and serves its events.
    let (mut restored, addr) = serve(&copy, &[], &[]);
    assert_eq!(
        sequences(&consume(addr, "orders", "c", "OrderPlaced")),
        [1, 2, 3]
    );
    restored.stop();
}

/// A database with three streams, one of them ~160 KiB of events, served in process.
fn served_with_events() -> crate::support::TestServer {
    let server = crate::support::TestServer::start();
    let filler = "x".repeat(8 * 1024);
    for n in 0..20 {
        publish_ok(&server, "big", &json!({"n": n, "filler": filler}));
    }
    for _ in 0..3 {
        append_ok(&server, "orders", "p1", &event("OrderPlaced"));
    }
    publish_ok(&server, "news", &json!(1));
    server
}

/// The names in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A backup is a complete database; an existing file at its path is kept unless `--force`
/// is given, which replaces it; no temporary file stays behind.
#[test]
fn backup_keeps_an_existing_file_unless_forced_to_replace_it() {
    let server = served_with_events();
    let out = tempfile::tempdir().unwrap();
    let copy = out.path().join("copy.db");
    let copy_arg = copy.to_str().unwrap();
    std::fs::write(&copy, "keep me").unwrap();
    admin(&server.db, &["backup", copy_arg]).fails(2, "already exists: --force replaces it");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "keep me");
    admin(&server.db, &["backup", copy_arg, "--force=yes"]).fails(2, "takes no value");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "keep me");

    let forced = admin(&server.db, &["backup", "--force", copy_arg]).ok();
    assert!(forced.stdout.contains("backed up"), "{}", forced.stdout);
    assert_eq!(names_in(out.path()), ["copy.db"]);
    let list = |db: &Path| admin(db, &["stream", "list"]).ok().stdout;
    assert_eq!(
        list(&copy),
        list(&server.db),
        "every stream, count and last event"
    );
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let (events, check): (i64, String) = conn
        .query_row(
            "SELECT (SELECT count(*) FROM events), (SELECT * FROM pragma_integrity_check)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((events, check.as_str()), (24, "ok"));
    // Forcing over an older backup replaces it with a current one.
    publish_ok(&server, "news", &json!(2));
    admin(&server.db, &["backup", copy_arg, "--force"]).ok();
    assert_eq!(list(&copy), list(&server.db));
    assert_eq!(names_in(out.path()), ["copy.db"]);
}

/// A backup that cannot be written (its directory missing, or the disk full mid-copy,
/// here a file-size limit with SIGXFSZ ignored) fails with status 1 and leaves neither a
/// file at its path nor a temporary one beside it.
#[test]
fn a_failed_backup_leaves_no_file_and_no_temporary() {
    let server = served_with_events();
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("no-such-dir").join("copy.db");
    admin(&server.db, &["backup", missing.to_str().unwrap()]).fails(1, "no-such-dir");
    assert_eq!(names_in(out.path()), Vec::<String>::new());

    let copy = out.path().join("copy.db");
    let script = format!(
        "trap '' XFSZ; exec prlimit --fsize=65536 \"$0\" backup {} --db {}",
        copy.display(),
        server.db.display()
    );
    let mut full = Proc::spawn(
        {
            let mut cmd = clean("sh");
            cmd.args(["-c", &script, BIN]);
            cmd
        },
        None,
    );
    assert_eq!(full.wait_exit(START).code(), Some(1), "{}", full.stderr());
    assert_eq!(
        names_in(out.path()),
        Vec::<String>::new(),
        "{}",
        full.stderr()
    );
    // With room again the same backup succeeds.
    admin(&server.db, &["backup", copy.to_str().unwrap()]).ok();
    assert_eq!(names_in(out.path()), ["copy.db"]);
}

// ---------------------------------------------------------------------------------------
// Configuration: every flag and environment variable
// ---------------------------------------------------------------------------------------

/// A serve setting with a value its parser refuses and one it takes.
struct Setting {
    flag: &'static str,
    var: &'static str,
    invalid: &'static str,
    valid: &'static str,
    /// What the start-up line shows for `valid`, if it shows this setting.
    logged: Option<&'static str>,
}

const SETTINGS: &[Setting] = &[
    Setting {
        flag: "--listen",
        var: "EVENTSERVER_LISTEN",
        invalid: "nowhere",
        valid: "127.0.0.1:0",
        logged: Some("listening on 127.0.0.1:"),
    },
    Setting {
        flag: "--workers",
        var: "EVENTSERVER_WORKERS",
        invalid: "abc",
        valid: "3",
        logged: Some(" workers=3 queue=16384 "),
    },
    Setting {
        flag: "--queue",
        var: "EVENTSERVER_QUEUE",
        invalid: "-1",
        valid: "5",
        logged: Some(" queue=5 "),
    },
    Setting {
        flag: "--max-body",
        var: "EVENTSERVER_MAX_BODY",
        invalid: "1MB",
        valid: "2048",
        logged: Some(" max_body=2048 "),
    },
    Setting {
        flag: "--max-limit",
        var: "EVENTSERVER_MAX_LIMIT",
        invalid: "x",
        valid: "10",
        logged: None,
    },
    Setting {
        flag: "--sync",
        var: "EVENTSERVER_SYNC",
        invalid: "maybe",
        valid: "normal",
        logged: Some(" sync=Normal "),
    },
    Setting {
        flag: "--longpoll-max-timeout",
        var: "EVENTSERVER_LONGPOLL_MAX_TIMEOUT",
        invalid: "soon",
        valid: "30",
        logged: Some(" longpoll_max_timeout=30 "),
    },
    Setting {
        flag: "--longpoll-max-batch",
        var: "EVENTSERVER_LONGPOLL_MAX_BATCH",
        invalid: "x",
        valid: "10",
        logged: None,
    },
    Setting {
        flag: "--sse-lifetime",
        var: "EVENTSERVER_SSE_LIFETIME",
        invalid: "0",
        valid: "60",
        logged: None,
    },
    Setting {
        flag: "--sse-heartbeat",
        var: "EVENTSERVER_SSE_HEARTBEAT",
        invalid: "often",
        valid: "5",
        logged: None,
    },
    Setting {
        flag: "--max-parked",
        var: "EVENTSERVER_MAX_PARKED",
        invalid: "many",
        valid: "100",
        logged: Some(" max_parked=100 max_connections=1100)"),
    },
    Setting {
        flag: "--events-path",
        var: "EVENTSERVER_EVENTS_PATH",
        invalid: "no-slash",
        valid: "/ev2",
        logged: None,
    },
    Setting {
        flag: "--publish-path",
        var: "EVENTSERVER_PUBLISH_PATH",
        invalid: "/api/v1/pub",
        valid: "/pub2",
        logged: None,
    },
    Setting {
        flag: "--write-queue",
        var: "EVENTSERVER_WRITE_QUEUE",
        invalid: "x",
        valid: "10",
        logged: None,
    },
    Setting {
        flag: "--auth-cache-secs",
        var: "EVENTSERVER_AUTH_CACHE_SECS",
        invalid: "x",
        valid: "5",
        logged: None,
    },
    Setting {
        flag: "--metrics-auth",
        var: "EVENTSERVER_METRICS_AUTH",
        invalid: "maybe",
        valid: "false",
        logged: None,
    },
    Setting {
        flag: "--max-connections",
        var: "EVENTSERVER_MAX_CONNECTIONS",
        invalid: "lots",
        valid: "100",
        logged: Some(" max_connections=100)"),
    },
    Setting {
        flag: "--auth-failure-limit",
        var: "EVENTSERVER_AUTH_FAILURE_LIMIT",
        invalid: "x",
        valid: "5",
        logged: None,
    },
    Setting {
        flag: "--auth-throttle-loopback",
        var: "EVENTSERVER_AUTH_THROTTLE_LOOPBACK",
        invalid: "maybe",
        valid: "true",
        logged: None,
    },
    Setting {
        flag: "--read-timeout",
        var: "EVENTSERVER_READ_TIMEOUT",
        invalid: "x",
        valid: "5",
        logged: None,
    },
    // Retention's behaviour is tested with retention; here only the flag/variable pair.
    Setting {
        flag: "--retain-events",
        var: "EVENTSERVER_RETAIN_EVENTS",
        invalid: "x",
        valid: "10",
        logged: None,
    },
    Setting {
        flag: "--retain-secs",
        var: "EVENTSERVER_RETAIN_SECS",
        invalid: "-5",
        valid: "3600",
        logged: None,
    },
    Setting {
        flag: "--retain-acked-only",
        var: "EVENTSERVER_RETAIN_ACKED_ONLY",
        invalid: "maybe",
        valid: "true",
        logged: None,
    },
    // CORS and the trusted proxies are tested in browser.rs and security.rs.
    Setting {
        flag: "--cors-origins",
        var: "EVENTSERVER_CORS_ORIGINS",
        invalid: "app.example",
        valid: "https://app.example,*",
        logged: None,
    },
    Setting {
        flag: "--trusted-proxies",
        var: "EVENTSERVER_TRUSTED_PROXIES",
        invalid: "10.0.0.0/99",
        valid: "10.0.0.0/8,::1",
        logged: None,
    },
];

/// For every setting: an invalid variable refuses to start (status 2, naming it, no
/// database created), an invalid flag likewise, and a valid flag wins over an invalid
/// variable (the variable is not even parsed) with the flag's value in force.
#[test]
fn each_setting_is_a_flag_and_a_variable_and_the_flag_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut started = Vec::new();
    for (i, s) in SETTINGS.iter().enumerate() {
        let db = dir.path().join(format!("{i}.db"));
        let db_s = db.to_str().unwrap();
        let listen = ["--listen", "127.0.0.1:0"];

        run(&["serve", "--db", db_s], &[(s.var, s.invalid)], None).fails(2, s.var);
        run(&["serve", "--db", db_s, s.flag, s.invalid], &[], None).fails(2, s.flag);
        let with_equals = format!("{}={}", s.flag, s.invalid);
        run(&["serve", "--db", db_s, &with_equals], &[], None).fails(2, s.flag);
        assert!(
            !db.exists(),
            "{}: a refused start created the database",
            s.var
        );

        let mut args = vec!["serve", "--db", db_s];
        if s.flag != "--listen" {
            args.extend(listen);
        }
        args.extend([s.flag, s.valid]);
        let proc = Proc::spawn(eventserver(&args, &[(s.var, s.invalid)]), None);
        started.push((s, proc));
    }
    for (s, proc) in &mut started {
        proc.listening();
        if let Some(logged) = s.logged {
            let line = proc.wait_stderr("listening on ", START);
            assert!(
                line.contains(logged),
                "{}: {logged:?} not in\n{line}",
                s.flag
            );
        }
    }
    for (_, proc) in &mut started {
        proc.stop();
    }
}

/// Every variable the shipped environment files set, or show commented out, is a setting
/// of `serve` (or the log level), so a node never refuses to start over a line copied from
/// them.
#[test]
fn the_shipped_environment_files_name_only_settings() {
    let files = [
        (
            "eventserver.env",
            include_str!("../../systemd/eventserver.env"),
        ),
        (
            "eventserver-node.env",
            include_str!("../../systemd/eventserver-node.env"),
        ),
    ];
    for (file, text) in files {
        let vars: Vec<&str> = text
            .lines()
            .filter_map(|line| line.trim_start_matches('#').split_once('='))
            .map(|(var, _)| var)
            .filter(|var| var.starts_with("EVENTSERVER_"))
            .collect();
        assert!(!vars.is_empty(), "{file} names no variable");
        for var in vars {
            assert!(
                var == "EVENTSERVER_LOG"
                    || eventserver::settings::SETTINGS
                        .iter()
                        .any(|s| s.var() == var),
                "{file}: {var} is not a setting"
            );
        }
    }
}

#[test]
fn invalid_command_lines_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never.db");
    let db_s = db.to_str().unwrap();
    let serve = |extra: &[&str], envs: &[(&str, &str)]| {
        let mut args = vec!["serve", "--db", db_s, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        run(&args, envs, None)
    };
    serve(&["--workers", "0"], &[]).fails(2, "--workers");
    serve(&["--workers", "abc"], &[]).fails(2, "--workers");
    serve(&["--workers", "2000"], &[]).fails(2, "--workers");
    serve(&["--workers"], &[]).fails(2, "--workers");
    serve(&["--sync", "maybe"], &[]).fails(2, "--sync");
    serve(&[], &[("EVENTSERVER_WORKERS", "x")]).fails(2, "EVENTSERVER_WORKERS");
    serve(&[], &[("EVENTSERVER_WORKERS", "0")]).fails(2, "EVENTSERVER_WORKERS must be at least 1");
    serve(&["--workers", "0"], &[("EVENTSERVER_WORKERS", "2")]).fails(2, "--workers must");
    serve(&[], &[("EVENTSERVER_SYNC", "maybe")]).fails(2, "EVENTSERVER_SYNC");
    serve(&["--nope"], &[]).fails(2, "--nope");
    serve(&["--nope=1"], &[]).fails(2, "--nope");
    serve(&["extra"], &[]).fails(2, "extra");
    serve(&["--longpoll-max-timeout", "0"], &[]).fails(2, "--longpoll-max-timeout");
    serve(&["--max-body", "0"], &[]).fails(2, "--max-body");
    serve(&["--events-path", "/x", "--publish-path", "/x"], &[]).fails(2, "path");
    serve(&["--metrics-auth", "yes"], &[]).fails(2, "--metrics-auth");
    serve(&[], &[("EVENTSERVER_LOG", "loud")]).fails(2, "EVENTSERVER_LOG");
    // Without `serve`, the flags go to serve just the same.
    run(&["--db", db_s, "--workers", "abc"], &[], None).fails(2, "--workers");
    run(&["frobnicate"], &[], None).fails(2, "frobnicate");
    run(&["user", "add"], &[], None).fails(2, "usage");
    run(&["stream", "list", "--nope", "1"], &[], None).fails(2, "--nope");
    assert!(!db.exists(), "a refused start created the database");
}

#[test]
fn listen_from_variable_and_flag() {
    let (_dir, db) = db_with_user();
    let db_s = db.to_str().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();

    // The variable alone.
    let mut p = Proc::spawn(
        eventserver(
            &["serve", "--db", db_s],
            &[("EVENTSERVER_LISTEN", "127.0.0.1:0")],
        ),
        None,
    );
    let addr = p.listening();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    assert_eq!(send(addr, Req::new(addr, "GET", "/healthz")).status, 200);
    p.stop();

    // The variable names a taken address: starting fails...
    let failed = run(
        &["serve", "--db", db_s],
        &[("EVENTSERVER_LISTEN", taken_addr.as_str())],
        None,
    );
    assert!(!failed.status.success(), "bound a taken address");
    assert!(failed.stderr.contains("ERROR"), "{}", failed.stderr);

    // ...unless the flag says otherwise: the flag wins.
    let mut p = Proc::spawn(
        eventserver(
            &["serve", "--db", db_s, "--listen", "127.0.0.1:0"],
            &[("EVENTSERVER_LISTEN", taken_addr.as_str())],
        ),
        None,
    );
    let addr = p.listening();
    assert_ne!(addr.to_string(), taken_addr);
    assert_eq!(send(addr, Req::new(addr, "GET", "/healthz")).status, 200);
    p.stop();
    drop(taken);
}

#[test]
fn database_from_variable_flag_state_directory_and_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    // Unless a case says otherwise, run where a stray ./eventserver.db would be noticed.
    let elsewhere = path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let start_stop = |args: &[&str], envs: &[(&str, &str)], cwd: Option<&Path>| {
        let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut cmd = eventserver(&all, envs);
        cmd.current_dir(cwd.unwrap_or(&elsewhere));
        let mut p = Proc::spawn(cmd, None);
        let addr = p.listening();
        assert_eq!(send(addr, Req::new(addr, "GET", "/healthz")).status, 200);
        p.stop();
        p.stdout()
    };

    // EVENTSERVER_DB alone.
    let env_db = path("env.db");
    let out = start_stop(&[], &[("EVENTSERVER_DB", env_db.to_str().unwrap())], None);
    assert!(env_db.exists(), "EVENTSERVER_DB was not used");
    assert!(out.contains(&format!("--db {}", env_db.display())), "{out}");
    // Admin commands read it too.
    let users = run(
        &["user", "list"],
        &[("EVENTSERVER_DB", env_db.to_str().unwrap())],
        None,
    )
    .ok();
    assert_eq!(users.stdout, "admin\n");

    // --db wins over EVENTSERVER_DB.
    let (ignored, flag_db) = (path("ignored.db"), path("flag.db"));
    start_stop(
        &["--db", flag_db.to_str().unwrap()],
        &[("EVENTSERVER_DB", ignored.to_str().unwrap())],
        None,
    );
    assert!(flag_db.exists(), "--db was not used");
    assert!(!ignored.exists(), "EVENTSERVER_DB won over --db");

    // Under systemd: $STATE_DIRECTORY/eventserver.db (the first of several directories).
    let (state, other) = (path("state"), path("other"));
    std::fs::create_dir(&state).unwrap();
    std::fs::create_dir(&other).unwrap();
    let dirs = format!("{}:{}", state.display(), other.display());
    start_stop(&[], &[("STATE_DIRECTORY", dirs.as_str())], None);
    assert!(
        state.join("eventserver.db").exists(),
        "STATE_DIRECTORY not used"
    );
    assert!(!other.join("eventserver.db").exists());
    assert!(
        !elsewhere.join("eventserver.db").exists(),
        "a stray ./eventserver.db"
    );

    // Otherwise ./eventserver.db.
    let cwd = path("cwd");
    std::fs::create_dir(&cwd).unwrap();
    start_stop(&[], &[], Some(&cwd));
    assert!(
        cwd.join("eventserver.db").exists(),
        "./eventserver.db not used"
    );
}

/// The variables `workers_queue_sync_and_max_parked_from_variables_and_flags` sets.
const WORKERS_AND_LIMITS_ENV: [(&str, &str); 5] = [
    ("EVENTSERVER_WORKERS", "3"),
    ("EVENTSERVER_SYNC", "normal"),
    ("EVENTSERVER_MAX_PARKED", "7"),
    ("EVENTSERVER_MAX_BODY", "4096"),
    ("EVENTSERVER_LONGPOLL_MAX_TIMEOUT", "50"),
];

#[test]
fn workers_queue_sync_and_max_parked_from_variables_and_flags() {
    let (_dir, db) = db_with_user();
    let (mut p, addr) = serve(&db, &[], &WORKERS_AND_LIMITS_ENV);
    let log = p.stderr();
    for logged in [
        " workers=3 queue=16384 ",
        " sync=Normal ",
        " max_parked=7 max_connections=1007)",
        " max_body=4096 ",
        " longpoll_max_timeout=50 ",
    ] {
        assert!(log.contains(logged), "{logged:?} not in\n{log}");
    }
    assert_eq!(send(addr, Req::new(addr, "GET", "/healthz")).status, 200);
    p.stop();

    // Flags win.
    let (mut p, _) = serve(
        &db,
        &["--workers", "5", "--sync", "full", "--max-parked", "9"],
        &[("EVENTSERVER_QUEUE", "11")],
    );
    let log = p.stderr();
    assert!(log.contains(" workers=5 queue=11 "), "{log}");
    p.stop();
    let (mut p, _) = serve(
        &db,
        &["--workers=5", "--sync=full", "--max-parked=9"],
        &WORKERS_AND_LIMITS_ENV,
    );
    let log = p.stderr();
    for logged in [
        " workers=5 queue=16384 ",
        " sync=Full ",
        " max_parked=9 max_connections=1009)",
    ] {
        assert!(log.contains(logged), "{logged:?} not in\n{log}");
    }
    p.stop();
}

/// A publish body of exactly `len` bytes.
fn publish_body(len: usize) -> Vec<u8> {
    let empty = r#"{"category":"big","data":""}"#.len();
    let body = format!(
        r#"{{"category":"big","data":"{}"}}"#,
        "x".repeat(len - empty)
    );
    assert_eq!(body.len(), len);
    body.into_bytes()
}

/// An event body of exactly `len` bytes.
fn event_body(len: usize) -> Vec<u8> {
    let empty = r#"{"event":{"name":"E"},"payload":""}"#.len();
    let body = format!(
        r#"{{"event":{{"name":"E"}},"payload":"{}"}}"#,
        "x".repeat(len - empty)
    );
    assert_eq!(body.len(), len);
    body.into_bytes()
}

#[test]
fn max_body_from_variable_and_flag() {
    let (_dir, db) = db_with_user();
    let env = [("EVENTSERVER_MAX_BODY", "200")];
    let pub_req = |addr, len| authed(addr, "POST", "/publish").body(publish_body(len));
    let app_req = |addr, len| {
        authed(addr, "POST", &events_path("big-events"))
            .header("X-Producer-ID", "p")
            .header("Content-Type", "application/json")
            .body(event_body(len))
    };

    let (mut p, addr) = serve(&db, &[], &env);
    assert_eq!(send(addr, pub_req(addr, 200)).status, 200);
    let too_large = send(addr, pub_req(addr, 201));
    assert_eq!(too_large.status, 413, "{}", too_large.text());
    assert_eq!(
        too_large.json(),
        json!({"error": "Payload Too Large - limit is 200 bytes"})
    );
    assert_eq!(send(addr, app_req(addr, 200)).status, 200);
    let too_large = send(addr, app_req(addr, 300));
    assert_eq!(too_large.status, 413);
    assert_eq!(
        too_large.json(),
        json!("Payload Too Large - limit is 200 bytes")
    );
    p.stop();

    // The flag wins.
    let (mut p, addr) = serve(&db, &["--max-body", "300"], &env);
    assert_eq!(send(addr, pub_req(addr, 300)).status, 200);
    assert_eq!(send(addr, app_req(addr, 300)).status, 200);
    assert_eq!(send(addr, pub_req(addr, 301)).status, 413);
    p.stop();
}

/// The variables `max_limit_and_longpoll_limits_from_variables_and_flags` sets.
const READ_LIMITS_ENV: [(&str, &str); 3] = [
    ("EVENTSERVER_MAX_LIMIT", "5"),
    ("EVENTSERVER_LONGPOLL_MAX_TIMEOUT", "5"),
    ("EVENTSERVER_LONGPOLL_MAX_BATCH", "2"),
];

#[test]
fn max_limit_and_longpoll_limits_from_variables_and_flags() {
    let (_dir, db) = db_with_user();
    let check = |flags: &[&str], max_limit: usize, max_timeout: u64, batch: usize| {
        let (mut p, addr) = serve(&db, flags, &READ_LIMITS_ENV);
        // Seed events once; later servers see them too.
        if consume_status(addr, 1) == 404 {
            for _ in 0..4 {
                append_ok(addr, "s", "p", &event("E"));
            }
        }
        assert_eq!(consume_status(addr, max_limit), 200);
        let over = consume_req(
            addr,
            "s",
            "c",
            &format!("eventName=E&limit={}", max_limit + 1),
        )
        .send();
        assert_eq!(over.status, 400);
        assert_eq!(
            over.json(),
            json!(format!(
                "Bad Request - 'limit' must be an integer from 1 to {max_limit}"
            ))
        );
        // The subscribe error names the configured maximum.
        let over = subscribe_req(addr, &format!("category=s&timeout={}", max_timeout + 1)).send();
        assert_eq!(over.status, 200);
        assert_eq!(
            over.json(),
            json!({
                "error": format!("Invalid or missing 'timeout' arg.  Must be 1-{max_timeout}.")
            })
        );
        // One answer holds at most the batch size.
        let page = subscribe_req(
            addr,
            &format!("category=s&timeout={max_timeout}&since_time=0"),
        )
        .send();
        assert_eq!(poll_events(&page).len(), batch);
        p.stop();
    };
    fn consume_status(addr: SocketAddr, limit: usize) -> u16 {
        consume_req(addr, "s", "c", &format!("eventName=E&limit={limit}"))
            .send()
            .status
    }
    check(&[], 5, 5, 2);
    check(
        &[
            "--max-limit",
            "6",
            "--longpoll-max-timeout",
            "7",
            "--longpoll-max-batch",
            "3",
        ],
        6,
        7,
        3,
    );
}

#[test]
fn max_parked_from_variable() {
    let (_dir, db) = db_with_user();
    let (mut p, addr) = serve(&db, &[], &[("EVENTSERVER_MAX_PARKED", "1")]);
    let poll = |category: &str| {
        let req = subscribe_req(addr, &format!("category={category}&timeout=30"));
        thread::spawn(move || try_send(addr, &req, Duration::from_secs(30)))
    };
    let first = poll("a");
    wait_parked(addr, 1);
    let second = poll("b").join().unwrap().expect("second poll answered");
    assert!(
        second.text().contains("too many parked long-polls"),
        "{}",
        second.text()
    );
    // Shutdown answers the parked one.
    p.stop();
    let first = first.join().unwrap().expect("first poll answered");
    assert!(poll_events(&first).is_empty());
}

#[test]
fn events_and_publish_paths_from_variables_and_flags() {
    const PATHS_ENV: [(&str, &str); 2] = [
        ("EVENTSERVER_EVENTS_PATH", "/sub"),
        ("EVENTSERVER_PUBLISH_PATH", "/pub"),
    ];
    let (_dir, db) = db_with_user();
    let check = |flags: &[&str], sub: &str, publ: &str| {
        let (mut p, addr) = serve(&db, flags, &PATHS_ENV);
        let category = format!("c{}", publ.replace('/', "-"));
        let body = json!({"category": category, "data": {"via": publ}});
        let resp = send(addr, authed(addr, "POST", publ).json(&body));
        assert_eq!(resp.status, 200, "publish on {publ}: {}", resp.text());
        let page = send(
            addr,
            authed(
                addr,
                "GET",
                &format!("{sub}?category={category}&timeout=5&since_time=0"),
            ),
        );
        let events = poll_events(&page);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["data"], json!({"via": publ}));
        // Other paths are not the long-poll API.
        for other in ["/events", "/publish", "/sub", "/pub"] {
            if other != sub && other != publ {
                let resp = send(addr, authed(addr, "POST", other).json(&body));
                assert_eq!(resp.status, 404, "{other} with {sub} {publ}");
            }
        }
        p.stop();
    };
    check(&[], "/sub", "/pub");
    check(
        &["--events-path", "/s2", "--publish-path", "/p2"],
        "/s2",
        "/p2",
    );
}

#[test]
fn metrics_auth_from_variable_and_flag() {
    let (_dir, db) = db_with_user();
    let anon = |addr| send(addr, Req::new(addr, "GET", "/metrics"));

    let (mut p, addr) = serve(&db, &[], &[]);
    let resp = anon(addr);
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.header("WWW-Authenticate"),
        Some("Basic realm=\"eventserver\"")
    );
    p.stop();

    let off = [("EVENTSERVER_METRICS_AUTH", "false")];
    let (mut p, addr) = serve(&db, &[], &off);
    let resp = anon(addr);
    assert_eq!(resp.status, 200);
    assert!(resp.text().contains("eventserver_http_requests_total"));
    p.stop();

    let (mut p, addr) = serve(&db, &["--metrics-auth", "true"], &off);
    assert_eq!(anon(addr).status, 401);
    p.stop();
}

/// The variables `public_subscribe_and_publish_from_variables_and_flags` sets.
const PUBLIC_ENV: [(&str, &str); 2] = [
    ("EVENTSERVER_PUBLIC_SUBSCRIBE", "news, pub-*"),
    ("EVENTSERVER_PUBLIC_PUBLISH", "open-*"),
];

#[test]
fn public_subscribe_and_publish_from_variables_and_flags() {
    let (_dir, db) = db_with_user();
    let anon_sub = |addr, category: &str| {
        send(
            addr,
            Req::new(
                addr,
                "GET",
                format!("/events?category={category}&timeout=5&since_time=0"),
            ),
        )
    };
    let anon_pub = |addr, category: &str| {
        send(
            addr,
            Req::new(addr, "POST", "/publish").json(&json!({"category": category, "data": 1})),
        )
    };

    let (mut p, addr) = serve(&db, &[], &PUBLIC_ENV);
    for category in ["news", "pub-1", "private", "open-1"] {
        publish_ok(addr, category, &json!(category));
    }
    assert_eq!(poll_events(&anon_sub(addr, "news")).len(), 1);
    assert_eq!(poll_events(&anon_sub(addr, "pub-1")).len(), 1);
    assert_eq!(anon_sub(addr, "private").status, 401);
    assert_eq!(anon_sub(addr, "newsy").status, 401);
    assert_eq!(anon_pub(addr, "open-2").status, 200);
    assert_eq!(anon_pub(addr, "news").status, 401);
    assert_eq!(anon_pub(addr, "private").status, 401);
    p.stop();

    // Flags win.
    let (mut p, addr) = serve(
        &db,
        &["--public-subscribe", "private", "--public-publish", "news"],
        &PUBLIC_ENV,
    );
    assert_eq!(anon_sub(addr, "news").status, 401);
    assert_eq!(poll_events(&anon_sub(addr, "private")).len(), 1);
    assert_eq!(anon_pub(addr, "open-3").status, 401);
    assert_eq!(anon_pub(addr, "news").status, 200);
    p.stop();
}

#[test]
fn auth_cache_secs_from_variable_and_flag() {
    let (_dir, db) = db_with_user();
    let check = |flags: &[&str], still_works_after_removal: bool| {
        eventserver::admin::add_user(&db, "temp", "pw").unwrap();
        let (mut p, addr) = serve(&db, flags, &[("EVENTSERVER_AUTH_CACHE_SECS", "3600")]);
        let status = || send(addr, Req::new(addr, "GET", "/metrics").auth("temp", "pw")).status;
        assert_eq!(status(), 200);
        admin(&db, &["user", "remove", "temp"]).ok();
        let expected = if still_works_after_removal { 200 } else { 401 };
        assert_eq!(status(), expected, "after removal with {flags:?}");
        p.stop();
    };
    // An hour-long cache keeps a verified password trusted after removal...
    check(&[], true);
    // ...and the flag wins: with no cache, removal takes effect at once.
    check(&["--auth-cache-secs", "0"], false);
}

/// Whether the server closes a connection that sends nothing, within `within`.
fn cut_within(addr: SocketAddr, within: Duration) -> bool {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(within)).unwrap();
    // EOF (perhaps after an error answer) or a reset is the cut; a timeout means the
    // connection is still open.
    match stream.read_to_end(&mut Vec::new()) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn read_timeout_from_variable_and_flag() {
    let (_dir, db) = db_with_user();
    let env = [("EVENTSERVER_READ_TIMEOUT", "1")];
    let (mut p, addr) = serve(&db, &[], &env);
    let silent = Instant::now();
    assert!(
        cut_within(addr, Duration::from_secs(5)),
        "a silent connection was kept"
    );
    assert!(
        silent.elapsed() >= Duration::from_millis(900),
        "cut too early"
    );
    p.stop();

    // The flag wins: a silent connection outlives the variable's second.
    let (mut p, addr) = serve(&db, &["--read-timeout", "30"], &env);
    assert!(
        !cut_within(addr, Duration::from_millis(2500)),
        "cut although --read-timeout is 30"
    );
    p.stop();
}

#[test]
fn log_level_from_variable() {
    let (_dir, db) = db_with_user();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let addr: SocketAddr = listen.parse().unwrap();
    let mut p = Proc::spawn(
        eventserver(
            &["serve", "--db", db.to_str().unwrap(), "--listen", &listen],
            &[("EVENTSERVER_LOG", "warn")],
        ),
        None,
    );
    wait_until(START, "the server answers", || {
        try_send(addr, &Req::new(addr, "GET", "/healthz"), START).is_ok_and(|r| r.status == 200)
    });
    send(addr, authed(addr, "GET", "/metrics"));
    p.stop();
    assert!(
        !p.stderr().contains("INFO"),
        "info lines at level warn:\n{}",
        p.stderr()
    );

    let (mut p, addr) = serve(&db, &[], &[("EVENTSERVER_LOG", "debug")]);
    send(addr, authed(addr, "GET", "/metrics"));
    p.stop();
    let log = p.stderr();
    assert!(log.contains("GET /metrics 200 "), "{log}");
    assert!(log.contains("shutting down"), "{log}");
}

// ---------------------------------------------------------------------------------------
// First start
// ---------------------------------------------------------------------------------------

#[test]
fn first_start_prints_a_working_admin_password_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fresh.db");
    let (mut p, addr) = serve(&db, &[], &[]);
    let out = p.wait_stdout("(shown only now)", START);
    let password = out
        .split_once("with password '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(pw, _)| pw.to_owned())
        .unwrap_or_else(|| panic!("no password on stdout:\n{out}"));
    assert!(password.len() >= 16, "a weak password: {password:?}");
    assert!(out.contains("Created user 'admin'"), "{out}");
    assert!(out.contains("eventserver user add NAME"), "{out}");

    assert_eq!(metrics_as(addr, "admin", &password), 200);
    assert_eq!(metrics_as(addr, "admin", "admin"), 401);
    assert_eq!(metrics_as(addr, "admin", ""), 401);
    publish_ok_as(addr, "admin", &password);
    p.stop();
    assert!(
        !p.stderr().contains(&password),
        "the password reached the log"
    );
    assert!(
        !p.stderr().contains(&basic("admin", &password)[6..]),
        "the Authorization header reached the log"
    );
    assert_eq!(admin(&db, &["user", "list"]).ok().stdout, "admin\n");

    // The second start prints no password, and the first one still works.
    let (mut p, addr) = serve(&db, &[], &[]);
    assert_eq!(metrics_as(addr, "admin", &password), 200);
    p.stop();
    assert_eq!(p.stdout(), "", "the second start printed something");
    assert_eq!(admin(&db, &["user", "list"]).ok().stdout, "admin\n");
}

fn metrics_as(addr: SocketAddr, user: &str, pw: &str) -> u16 {
    send(addr, Req::new(addr, "GET", "/metrics").auth(user, pw)).status
}

#[track_caller]
fn publish_ok_as(addr: SocketAddr, user: &str, pw: &str) {
    let resp = send(
        addr,
        Req::new(addr, "POST", "/publish")
            .auth(user, pw)
            .json(&json!({"category": "c", "data": 1})),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

#[test]
fn notify_ready_after_the_port_answers_and_stopping_on_sigterm() {
    let (dir, db) = db_with_user();
    let (mut p, mut notify) = serve_notified(dir.path(), &db, &[]);
    let ready = notify.expect("READY=1", START);
    // The same datagram says where it serves; the port answers the moment READY arrives.
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=serving on "))
        .unwrap_or_else(|| panic!("no STATUS line in {ready:?}"));
    let addr: SocketAddr = status.parse().unwrap();
    let health = try_send(addr, &Req::new(addr, "GET", "/healthz"), START)
        .expect("the port answers once READY=1 was sent");
    assert_eq!(health.status, 200);
    assert_eq!(p.listening(), addr);
    assert_eq!(
        notify.seen.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "READY=1 once"
    );

    p.terminate();
    let stopping = notify.expect("STOPPING=1", SHUTDOWN);
    assert!(stopping.contains("STATUS="), "{stopping:?}");
    let status = p.wait_exit(SHUTDOWN);
    assert_eq!(status.code(), Some(0), "{}", p.stderr());
    // No watchdog pings without WATCHDOG_USEC.
    assert!(
        !notify.seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "{:?}",
        notify.seen
    );
}

#[test]
fn notify_socket_in_the_abstract_namespace() {
    use std::os::linux::net::SocketAddrExt;
    let (_dir, db) = db_with_user();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("eventserver-test-{}-{nanos}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut notify = Notify {
        sock,
        seen: Vec::new(),
    };
    let at = format!("@{name}");
    let args = serve_args(&db, &[]);
    let mut p = Proc::spawn(eventserver(&args, &[("NOTIFY_SOCKET", at.as_str())]), None);
    notify.expect("READY=1", START);
    p.terminate();
    notify.expect("STOPPING=1", SHUTDOWN);
    assert_eq!(p.wait_exit(SHUTDOWN).code(), Some(0));
}

#[test]
fn watchdog_pings_while_healthy_and_stops_when_the_database_is_locked() {
    let (dir, db) = db_with_user();
    let (mut p, mut notify) = serve_notified(dir.path(), &db, &[("WATCHDOG_USEC", "500000")]);
    notify.expect("READY=1", START);
    for _ in 0..3 {
        notify.expect("WATCHDOG=1", Duration::from_secs(2));
    }

    // The watchdog checks health: with the database locked for writing, pings stop...
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.busy_timeout(Duration::from_secs(5)).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    notify.expect_watchdog_silence(Duration::from_secs(1), Duration::from_secs(5));
    // ...and resume once it is writable again.
    lock.execute_batch("ROLLBACK").unwrap();
    notify.expect("WATCHDOG=1", Duration::from_secs(7));
    drop(lock);
    p.stop();
    assert!(
        p.stderr().contains("health self-check failed"),
        "{}",
        p.stderr()
    );
}

#[test]
fn watchdog_pid_for_another_process_means_no_pings() {
    let (dir, db) = db_with_user();
    // For another process: ignored.
    let (mut p, mut notify) = serve_notified(
        dir.path(),
        &db,
        &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")],
    );
    notify.expect("READY=1", START);
    // At 100 ms, a second would hold about thirty pings; none may come.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(1) {
        notify.recv();
    }
    p.stop();
    assert!(
        !notify.seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "{:?}",
        notify.seen
    );

    // For this very process (a shell that execs the server keeps its pid): pings.
    let path = dir.path().join("notify2.sock");
    let mut notify = Notify::bind(&path);
    let mut cmd = clean("/bin/sh");
    cmd.args([
        "-c",
        "export WATCHDOG_PID=$$; exec \"$0\" serve --db \"$1\" --listen 127.0.0.1:0",
        BIN,
        db.to_str().unwrap(),
    ])
    .env("NOTIFY_SOCKET", &path)
    .env("WATCHDOG_USEC", "300000");
    let mut p = Proc::spawn(cmd, None);
    notify.expect("READY=1", START);
    notify.expect("WATCHDOG=1", Duration::from_secs(2));
    p.stop();
}

#[test]
fn socket_activation_serves_through_the_passed_socket() {
    assert!(
        Path::new(SOCKET_ACTIVATE).exists(),
        "{SOCKET_ACTIVATE} is missing (Debian's systemd package provides it)"
    );
    let (_dir, db) = db_with_user();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let addr: SocketAddr = listen.parse().unwrap();
    let mut cmd = clean(SOCKET_ACTIVATE);
    // --listen points elsewhere: only the passed socket can answer on `port`.
    cmd.args([
        "-l",
        &listen,
        BIN,
        "serve",
        "--db",
        db.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut p = Proc::spawn(cmd, None);
    // systemd-socket-activate binds first and starts the server on the first connection.
    p.wait_stderr(&format!("Listening on {listen}"), START);
    let health = try_send(addr, &Req::new(addr, "GET", "/healthz"), START)
        .expect("an answer through the passed socket");
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
    assert_eq!(p.listening(), addr, "the server adopted the passed socket");
    publish_ok(addr, "activated", &json!(1));
    // systemd-socket-activate execs the server, so this pid is the server's.
    p.stop();
    assert!(p.stderr().contains("shutdown complete"), "{}", p.stderr());
}

#[test]
fn listen_fds_for_another_process_are_ignored() {
    let (_dir, db) = db_with_user();
    let (mut p, addr) = serve(&db, &[], &[("LISTEN_FDS", "1"), ("LISTEN_PID", "1")]);
    assert_eq!(send(addr, Req::new(addr, "GET", "/healthz")).status, 200);
    p.stop();
}

// ---------------------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------------------

#[test]
fn sigterm_answers_parked_polls_and_keeps_every_acknowledged_publish() {
    let (_dir, db) = db_with_user();
    let (mut server, addr) = serve(&db, &["--workers", "4"], &[]);

    // Parked polls: some on a category nobody publishes to (answered only by shutdown),
    // some on the category being published to (events or shutdown).
    let poll = |category: &str| {
        let req = subscribe_req(addr, &format!("category={category}&timeout=100"));
        thread::spawn(move || try_send(addr, &req, Duration::from_secs(30)))
    };
    let idle: Vec<_> = (0..4).map(|_| poll("idle")).collect();
    let busy: Vec<_> = (0..2).map(|_| poll("pubs")).collect();
    wait_parked(addr, 6);

    // Publishers run until the server stops answering them; each remembers its 200s.
    let publishers: Vec<JoinHandle<(Vec<u64>, usize)>> = (0..6u64)
        .map(|w| {
            thread::spawn(move || {
                let mut acknowledged = Vec::new();
                let mut refused = 0;
                for i in 0..100_000u64 {
                    let n = w * 1_000_000 + i;
                    let req = publish_req(addr, "pubs", &json!({ "n": n }));
                    match try_send(addr, &req, Duration::from_secs(10)) {
                        Ok(resp) if resp.status == 200 => acknowledged.push(n),
                        // Refused (503 while stopping) or cut off: the server is going.
                        Ok(_) => {
                            refused += 1;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                (acknowledged, refused)
            })
        })
        .collect();
    wait_until(START, "publishes got answered", || {
        scrape(addr)
            .get("eventserver_events_appended_total{stream=\"pubs\"}")
            .is_some_and(|n| *n >= 50.0)
    });

    let signalled = Instant::now();
    server.terminate();
    let status = server.wait_exit(SHUTDOWN);
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    assert!(took < SHUTDOWN, "shutdown took {took:?}");

    // Every poll got an answer: the timeout body (or, on the busy category, events).
    for handle in idle {
        let resp = handle.join().unwrap().expect("a parked poll got no answer");
        assert_eq!(resp.status, 200);
        let body = resp.json();
        assert_eq!(body["timeout"], json!("no events before timeout"), "{body}");
    }
    for handle in busy {
        let resp = handle.join().unwrap().expect("a parked poll got no answer");
        poll_events(&resp);
    }
    let mut acknowledged = Vec::new();
    for handle in publishers {
        let (ok, _) = handle.join().unwrap();
        acknowledged.extend(ok);
    }
    assert!(acknowledged.len() >= 50, "{} publishes", acknowledged.len());

    // Afterwards every acknowledged publish is in the database.
    let show = admin(&db, &["stream", "show", "pubs"]).ok().stdout;
    let stored: usize = field(&show, "events").parse().unwrap();
    assert!(
        stored >= acknowledged.len(),
        "{stored} stored < {} acknowledged",
        acknowledged.len()
    );
    let (mut server, addr) = serve(&db, &[], &[]);
    let mut seen = HashSet::new();
    let mut query = "since_time=0".to_owned();
    while seen.len() < stored {
        let page = subscribe_req(addr, &format!("category=pubs&timeout=5&{query}")).send();
        let events = poll_events(&page);
        assert!(
            !events.is_empty(),
            "paging stopped at {} of {stored}",
            seen.len()
        );
        for e in &events {
            assert!(
                seen.insert(e["data"]["n"].as_u64().unwrap()),
                "duplicate {e}"
            );
        }
        let last = events.last().unwrap();
        query = format!(
            "since_time={}&last_id={}",
            last["timestamp"],
            last["id"].as_str().unwrap()
        );
    }
    let missing: Vec<_> = acknowledged.iter().filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------

#[test]
fn healthz_is_ok_and_503_while_the_database_takes_no_writes() {
    let (_dir, db) = db_with_user();
    let (mut server, addr) = serve(&db, &[], &[]);
    for path in ["/healthz", "/api/v1/health"] {
        let resp = send(addr, Req::new(addr, "GET", path));
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        assert_eq!(resp.text(), r#"{"status":"ok"}"#, "{path}");
        assert_eq!(
            resp.header("Content-Type"),
            Some("application/json; charset=utf-8")
        );
    }

    // The tests run as root, where chmod does not stop writes; another connection holding
    // the database's write lock does: the heartbeat write waits out SQLite's busy timeout
    // (5 s) and fails. Only /healthz is asked here: each probe in its own commit costs 5 s,
    // and both paths are the same route (checked above and below).
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.busy_timeout(Duration::from_secs(5)).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let resp = try_send(
        addr,
        &Req::new(addr, "GET", "/healthz"),
        Duration::from_secs(15),
    )
    .expect("an answer while the database is locked");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.text(), r#"{"status":"unavailable"}"#);
    assert_eq!(
        resp.header("Content-Type"),
        Some("application/json; charset=utf-8")
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    wait_until(START, "healthy again", || {
        send(addr, Req::new(addr, "GET", "/healthz")).status == 200
    });
    let resp = send(addr, Req::new(addr, "GET", "/api/v1/health"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), r#"{"status":"ok"}"#);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

#[test]
fn metrics_count_known_traffic() {
    const N: usize = 5; // appends
    const M: usize = 3; // publishes
    const K: usize = 2; // ACKs
    let (_dir, db) = db_with_user();
    let (mut server, addr) = serve(&db, &[], &[]);

    let ids: Vec<String> = (0..N)
        .map(|_| append_ok(addr, "m-orders", "p", &event("Placed")))
        .collect();
    for i in 0..M {
        publish_ok(addr, "m-news", &json!(i));
    }
    assert_eq!(consume(addr, "m-orders", "c1", "Placed").len(), N);
    ack(addr, "m-orders", "c1", &ids[1]);
    ack(addr, "m-orders", "c1", &ids[2]);
    let denied = send(
        addr,
        Req::new(
            addr,
            "GET",
            format!("{}?eventName=Placed&limit=1", events_path("m-orders")),
        )
        .header("X-Consumer-ID", "c1"),
    );
    assert_eq!(denied.status, 401);
    assert_eq!(send(addr, Req::new(addr, "GET", "/metrics")).status, 401);
    let parked = {
        let req = subscribe_req(addr, "category=m-idle&timeout=30");
        thread::spawn(move || try_send(addr, &req, Duration::from_secs(30)))
    };

    let streams_ok = "eventserver_http_requests_total{route=\"streams\",status=\"200\"}";
    let metrics_denied = "eventserver_http_requests_total{route=\"metrics\",status=\"401\"}";
    // Counts are recorded just after each answer is sent: scrape until the last is in.
    let deadline = Instant::now() + START;
    let samples = loop {
        let samples = scrape(addr);
        if samples.get(streams_ok) >= Some(&((N + 1 + K) as f64))
            && samples.get(metrics_denied) >= Some(&1.0)
            && samples.get("eventserver_longpoll_parked") == Some(&1.0)
        {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "the traffic never showed up in the metrics: {samples:?}"
        );
        thread::sleep(Duration::from_millis(5));
    };
    let requests = |route: &str, status: u16| {
        sample(
            &samples,
            &format!("eventserver_http_requests_total{{route=\"{route}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(requests("streams", 200), (N + 1 + K) as f64);
    assert_eq!(requests("streams", 401), 1.0);
    assert_eq!(requests("publish", 200), M as f64);
    assert_eq!(requests("metrics", 401), 1.0);
    for key in samples.keys() {
        if let Some(labels) = key.strip_prefix("eventserver_http_requests_total") {
            assert!(
                [
                    "{route=\"streams\",status=\"200\"}",
                    "{route=\"streams\",status=\"401\"}",
                    "{route=\"publish\",status=\"200\"}",
                    "{route=\"metrics\",status=\"401\"}",
                    "{route=\"metrics\",status=\"200\"}",
                ]
                .contains(&labels),
                "unexpected requests sample {key}"
            );
        }
    }
    let streams_seen = sample(
        &samples,
        "eventserver_http_request_duration_seconds_count{route=\"streams\"}",
    );
    assert_eq!(streams_seen, (N + 1 + K + 1) as f64);
    assert_eq!(
        sample(
            &samples,
            "eventserver_http_request_duration_seconds_bucket{route=\"streams\",le=\"+Inf\"}"
        ),
        streams_seen
    );
    let mut previous = 0.0;
    for le in [
        "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
        "2.5", "5", "10", "+Inf",
    ] {
        let bucket = sample(
            &samples,
            &format!(
                "eventserver_http_request_duration_seconds_bucket{{route=\"streams\",le=\"{le}\"}}"
            ),
        );
        assert!(bucket >= previous, "buckets are cumulative (le={le})");
        previous = bucket;
    }

    assert_eq!(
        sample(
            &samples,
            "eventserver_events_appended_total{stream=\"m-orders\"}"
        ),
        N as f64
    );
    assert_eq!(
        sample(
            &samples,
            "eventserver_events_appended_total{stream=\"m-news\"}"
        ),
        M as f64
    );
    assert_eq!(
        samples
            .keys()
            .filter(|k| k.starts_with("eventserver_events_appended_total"))
            .count(),
        2
    );
    // Every job the writer committed: the appends, the publishes and the ACKs.
    assert_eq!(
        sample(&samples, "eventserver_writer_batch_size_sum"),
        (N + M + K) as f64
    );
    let commits = sample(&samples, "eventserver_writer_batch_size_count");
    assert!(
        (1.0..=(N + M + K) as f64).contains(&commits),
        "{commits} commits"
    );
    assert_eq!(
        sample(&samples, "eventserver_writer_commit_seconds_count"),
        commits
    );
    // c1 acknowledged up to the third of five.
    assert_eq!(
        sample(
            &samples,
            "eventserver_consumer_lag{stream=\"m-orders\",consumer=\"c1\",event_name=\"Placed\"}"
        ),
        (N - 3) as f64
    );
    assert_eq!(sample(&samples, "eventserver_longpoll_parked"), 1.0);
    assert!(sample(&samples, "eventserver_database_bytes") > 0.0);

    let resp = send(addr, authed(addr, "GET", "/metrics"));
    assert!(
        resp.header("Content-Type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        resp.header("Content-Type")
    );
    let text = resp.text();
    for family in [
        "# TYPE eventserver_http_requests_total counter",
        "# TYPE eventserver_http_request_duration_seconds histogram",
        "# TYPE eventserver_events_appended_total counter",
        "# TYPE eventserver_longpoll_parked gauge",
        "# TYPE eventserver_consumer_lag gauge",
        "# TYPE eventserver_database_bytes gauge",
    ] {
        assert!(text.contains(family), "no {family:?}");
    }

    server.stop();
    let answered = parked
        .join()
        .unwrap()
        .expect("the parked poll was answered");
    assert!(poll_events(&answered).is_empty());

    // One log line per request, with the user name but never the password.
    let log = server.stderr();
    assert_eq!(
        log.matches("POST /api/v1/streams/m-orders/events 200 ")
            .count(),
        N,
        "{log}"
    );
    assert!(log.contains("user=tester"), "{log}");
    assert!(log.contains("GET /metrics 401 "), "{log}");
    assert!(!log.contains(PASSWORD), "the password reached the log");
    assert!(
        !log.contains(&basic(USER, PASSWORD)[6..]),
        "the Authorization header reached the log"
    );
}

/// A read timeout that does not outlast the longest long-poll is allowed but warned about
/// at start (such polls lose their connection after the answer); the defaults are quiet.
#[test]
fn a_read_timeout_within_the_longest_poll_is_warned_about() {
    let warning = "--read-timeout 60s does not outlast --longpoll-max-timeout 110s";
    let (_dir, db) = db_with_user();
    let (mut warned, _) = serve(&db, &["--read-timeout", "60"], &[]);
    warned.wait_stderr(warning, START);
    let (_dir, db) = db_with_user();
    let (mut quiet, addr) = serve(&db, &[], &[]);
    assert_eq!(send(addr, Req::new(addr, "GET", "/healthz")).status, 200);
    // Stopped and reaped first, so everything it would ever log is in.
    quiet.stop();
    assert!(
        !quiet.stderr().contains("does not outlast"),
        "{}",
        quiet.stderr()
    );
}

/// Only `user add` creates a database: every other command on a mistyped `--db` fails and
/// names the path, leaving no file behind (a backup of a new empty database would have
/// "succeeded"); none of them, `user add` included, migrates a database of another schema
/// version.
#[test]
fn admin_commands_other_than_user_add_need_an_existing_database() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo.db");
    let copy = dir.path().join("copy.db");
    let copy_arg = copy.to_str().unwrap();
    let commands: [&[&str]; 7] = [
        &["user", "list"],
        &["user", "remove", "someone"],
        &["stream", "list"],
        &["stream", "show", "orders"],
        &["stream", "release", "orders"],
        &["consumer", "reset", "orders", "billing", "OrderPlaced", "0"],
        &["backup", copy_arg],
    ];
    for args in commands {
        admin(&missing, args).fails(1, &format!("no database at {}", missing.display()));
    }
    assert!(!missing.exists(), "a command created {}", missing.display());
    assert!(!copy.exists(), "a backup was written from nothing");

    // A SQLite file that is not ours, and one of an older schema, are left as they are.
    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    admin(&foreign, &["stream", "list"]).fails(1, "is not an eventserver database");
    let (_dir, db) = db_with_user();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA user_version = 1")
        .unwrap();
    admin(&db, &["stream", "list"]).fails(1, "start the server once to upgrade it");
    run(
        &["user", "add", "bob", "--db", db.to_str().unwrap()],
        &[],
        Some("pw-pw-pw-pw\n"),
    )
    .fails(1, "start the server once to upgrade it");
    let version: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1, "a command migrated the database");

    // `user add` still creates one, ready for the server.
    let fresh = dir.path().join("fresh.db");
    run(
        &["user", "add", "alice", "--db", fresh.to_str().unwrap()],
        &[],
        Some("pw-pw-pw-pw\n"),
    )
    .ok();
    assert_eq!(admin(&fresh, &["user", "list"]).ok().stdout, "alice\n");
}
