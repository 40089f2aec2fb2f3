//! The shipped nginx site file (`systemd/eventserver.nginx`) in a real nginx, with curl as
//! the browser: TLS and HTTP/2 in front, long-polls and publishes passed through to
//! eventserver, oversized heads and bodies refused before they reach it, and the headers and
//! keep-alive nginx uses upstream.
//!
//! Each test runs a throwaway nginx of its own: a minimal `nginx.conf` in a temporary
//! directory (pid file, logs and temporary paths inside it) that includes the site file with
//! five lines changed (the two listen lines, the upstream address and the certificate
//! paths), and a self-signed certificate made with the openssl CLI. nginx runs in the
//! foreground as one process (`master_process off`), so killing it when the test ends leaves
//! no worker behind and it needs no `user` even as root; the site's directives behave the
//! same. It listens on a free port of 127.0.0.1 only, so a system nginx (Debian's package
//! starts one on port 80) does not matter. Without nginx, curl or openssl the tests fail
//! when `CI` is set and are skipped with a message otherwise.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{PASSWORD, Proc, TestServer, USER, authed, wait_until};

/// The site file as shipped.
const SITE: &str = include_str!("../../systemd/eventserver.nginx");
/// How long nginx may take to start listening, and a short exchange through it to finish.
const START: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// nginx, curl and openssl
// ---------------------------------------------------------------------------------------

/// nginx's path, or `None` (with the reason printed) when the tools these tests drive are
/// missing and `CI` is not set; in CI a missing tool fails the test.
fn tools() -> Option<PathBuf> {
    let nginx = find("nginx");
    let missing: Vec<&str> = [
        ("nginx", nginx.is_some()),
        ("curl", find("curl").is_some()),
        ("openssl", find("openssl").is_some()),
    ]
    .into_iter()
    .filter_map(|(tool, found)| (!found).then_some(tool))
    .collect();
    if missing.is_empty() {
        return nginx;
    }
    let why = format!(
        "the reverse-proxy tests need {} (Debian: apt-get install nginx curl openssl)",
        missing.join(", ")
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    None
}

/// `program` on `PATH` or in `/usr/sbin` (where Debian puts nginx, often off a user's
/// `PATH`).
fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Runs `cmd` to completion, failing the test with its output unless it succeeds.
#[track_caller]
fn succeed(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The site file with only what a test must change: the port, the upstream and the
/// certificate. Each line is asserted present once, so the test cannot silently drift from
/// the shipped file.
fn site_for(port: u16, upstream: SocketAddr, cert: &Path, key: &Path) -> String {
    let changes = [
        (
            "listen 443 ssl http2;",
            format!("listen 127.0.0.1:{port} ssl http2;"),
        ),
        // Loopback IPv4 is all a test needs, and IPv6 may be missing where it runs.
        ("listen [::]:443 ssl http2;", String::new()),
        ("server 127.0.0.1:8080;", format!("server {upstream};")),
        (
            "ssl_certificate /etc/ssl/eventserver/fullchain.pem;",
            format!("ssl_certificate {};", cert.display()),
        ),
        (
            "ssl_certificate_key /etc/ssl/eventserver/privkey.pem;",
            format!("ssl_certificate_key {};", key.display()),
        ),
    ];
    changes.iter().fold(SITE.to_owned(), |site, (from, to)| {
        assert_eq!(
            site.matches(from).count(),
            1,
            "the site file has one {from:?}"
        );
        site.replace(from, to)
    })
}

/// A throwaway nginx serving the site file in front of `upstream`, killed when dropped
/// (being one process, nothing of it outlives the test).
struct Nginx {
    /// nginx's HTTPS port on 127.0.0.1.
    port: u16,
    _process: Proc,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx in front of `upstream` and waits until its port accepts connections.
    fn start(nginx: &Path, upstream: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().expect("temp dir");
        let at = |name: &str| dir.path().join(name);
        let (cert, key) = (at("cert.pem"), at("key.pem"));
        succeed(
            Command::new("openssl")
                .args(["req", "-x509", "-nodes", "-newkey", "ec"])
                .args(["-pkeyopt", "ec_paramgen_curve:prime256v1"])
                .args(["-days", "1", "-subj", "/CN=localhost", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        std::fs::write(at("site.conf"), site_for(port, upstream, &cert, &key)).unwrap();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\n\
             master_process off;\n\
             pid {d}/nginx.pid;\n\
             error_log stderr info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             access_log off;\n\
             client_body_temp_path {d}/client_body;\n\
             proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             include {d}/site.conf;\n\
             }}\n"
        );
        std::fs::write(at("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new(nginx);
        // `-e` before the configuration is read, so nginx never opens its system log.
        cmd.args(["-e", "stderr", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(at("nginx.conf"));
        let mut proc = Proc::spawn(cmd, None);
        let deadline = Instant::now() + START;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                proc.alive(),
                "nginx exited at start:\n{}\nwith the site file:\n{}",
                proc.stderr(),
                site_for(port, upstream, &cert, &key)
            );
            assert!(
                Instant::now() < deadline,
                "nginx is not listening on {port}"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Nginx {
            port,
            _process: proc,
            _dir: dir,
        }
    }

    /// `path` on nginx's HTTPS port.
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

/// A throwaway nginx in front of a server started in process, or `None` when skipped.
fn front() -> Option<(TestServer, Nginx)> {
    let nginx = tools()?;
    let server = TestServer::start();
    let front = Nginx::start(&nginx, server.addr);
    Some((server, front))
}

/// What curl got: the protocol it spoke, the status and the body. Status 0 means no answer
/// (curl's `000`), with curl's error in `body`.
#[derive(Debug)]
struct Got {
    version: String,
    status: u16,
    body: String,
    took: Duration,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// Runs curl against `url` with the test user's credentials, trusting the self-signed
/// certificate (`-k`); `args` pick the protocol (`--http2`, `--http1.1`) and the rest.
fn curl(url: &str, args: &[&str]) -> Got {
    let started = Instant::now();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "--max-time",
            "30",
            "-u",
            &format!("{USER}:{PASSWORD}"),
        ])
        .args(["-o", "-", "-w", "\n%{http_version} %{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, last) = stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no -w line from curl: {stdout:?}"));
    let (version, status) = last.split_once(' ').expect("version and status");
    let body = if out.status.success() {
        body.to_owned()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    Got {
        version: version.to_owned(),
        status: status.parse().expect("a status"),
        body,
        took,
    }
}

/// A publish through nginx of `data` to `category`, over `protocol`.
fn publish(front: &Nginx, protocol: &str, category: &str, data: &Value) -> Got {
    let body = json!({ "category": category, "data": data }).to_string();
    curl(
        &front.url("/publish"),
        &[
            protocol,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
        ],
    )
}

/// Requests eventserver has answered, by `/metrics` (the scrapes themselves left out).
fn answered(server: &TestServer) -> u64 {
    let resp = authed(server.addr, "GET", "/metrics").send();
    assert_eq!(resp.status, 200, "metrics: {}", resp.text());
    resp.text()
        .lines()
        .filter(|l| l.starts_with("eventserver_http_requests_total{"))
        .filter(|l| !l.contains("route=\"metrics\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The duration, in seconds, of `directive` in the site file (`directive 130s;`).
fn seconds(directive: &str) -> u64 {
    let line = SITE
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("{directive} ")))
        .unwrap_or_else(|| panic!("no {directive} in the site file"));
    let value = line[directive.len()..].trim().trim_end_matches(';');
    value
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{directive} is not in seconds: {line:?}"))
}

// ---------------------------------------------------------------------------------------
// Through nginx to eventserver
// ---------------------------------------------------------------------------------------

/// A browser's long-poll over HTTP/2 waits, parked in eventserver, until a publish through
/// the same front wakes it, and both get eventserver's answers.
#[test]
fn a_long_poll_over_http_2_is_woken_by_a_publish_through_nginx() {
    let Some((server, front)) = front() else {
        return;
    };
    let poll_url = front.url("/events?category=proxied&timeout=20");
    let poll = thread::spawn(move || curl(&poll_url, &["--http2"]));
    wait_until(START, "the poll is parked in eventserver", || {
        server.handle().parked() == 1
    });

    let published = publish(&front, "--http1.1", "proxied", &json!({ "n": 1 }));
    assert_eq!(
        (published.version.as_str(), published.status),
        ("1.1", 200),
        "{published:?}"
    );
    assert_eq!(published.body, r#"{"success": true}"#);

    let got = poll.join().expect("the poll thread");
    assert_eq!((got.version.as_str(), got.status), ("2", 200), "{got:?}");
    let events = got.json()["events"].clone();
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{got:?}");
    assert_eq!(events[0]["data"], json!({ "n": 1 }));
    assert_eq!(events[0]["category"], "proxied");
}

/// A poll ends with eventserver's own timeout answer, after its timeout, and nginx waits
/// longer than the longest poll eventserver allows, so none is ever cut by nginx (a 504).
#[test]
fn a_long_poll_through_nginx_ends_with_eventservers_timeout_answer() {
    let defaults = eventserver::Config::new("unused.db");
    assert!(
        seconds("proxy_read_timeout") > defaults.longpoll_max_timeout,
        "nginx's proxy_read_timeout must outlast --longpoll-max-timeout ({} s)",
        defaults.longpoll_max_timeout
    );
    assert!(
        Duration::from_secs(seconds("keepalive_timeout")) < defaults.read_timeout,
        "nginx must drop idle upstream connections before eventserver's --read-timeout"
    );
    let Some((_server, front)) = front() else {
        return;
    };
    let got = curl(&front.url("/events?category=quiet&timeout=2"), &["--http2"]);
    assert_eq!((got.version.as_str(), got.status), ("2", 200), "{got:?}");
    assert_eq!(got.json()["timeout"], "no events before timeout", "{got:?}");
    assert!(
        got.took >= Duration::from_secs(2) && got.took < Duration::from_secs(10),
        "answered after {:?}, not after the poll's 2 s",
        got.took
    );
}

/// tiny_http bounds no request head; nginx refuses one with a 16 KiB header line — over
/// HTTP/1.1 with a 400, over HTTP/2 by ending the connection — and a body over eventserver's
/// 1 MiB `--max-body` with a 413, none of them passed on.
#[test]
fn oversized_heads_and_bodies_are_refused_by_nginx() {
    let Some((server, front)) = front() else {
        return;
    };
    let before = answered(&server);
    let huge = format!("X-Huge: {}", "a".repeat(16 * 1024));
    let url = front.url("/events?category=huge&timeout=1");

    let got = curl(&url, &["--http1.1", "-H", &huge]);
    assert_eq!((got.version.as_str(), got.status), ("1.1", 400), "{got:?}");
    assert!(
        got.body.contains("Request Header Or Cookie Too Large"),
        "nginx's own refusal: {got:?}"
    );

    let got = curl(&url, &["--http2", "-H", &huge]);
    assert_eq!(got.status, 0, "HTTP/2 with a 16 KiB header: {got:?}");

    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.json");
    let data = "x".repeat(1 << 20);
    std::fs::write(
        &big,
        json!({ "category": "huge", "data": data }).to_string(),
    )
    .unwrap();
    let got = curl(
        &front.url("/publish"),
        &["--http2", "--data-binary", &format!("@{}", big.display())],
    );
    assert_eq!((got.version.as_str(), got.status), ("2", 413), "{got:?}");

    assert_eq!(
        answered(&server),
        before,
        "eventserver answered none of them"
    );
    let ok = curl(&url, &["--http2"]);
    assert_eq!(ok.status, 200, "and nginx still serves: {ok:?}");
}

// ---------------------------------------------------------------------------------------
// What nginx sends upstream
// ---------------------------------------------------------------------------------------

/// One request head, through its blank line.
fn read_head(reader: &mut impl BufRead) -> String {
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let n = reader.read_line(&mut head).expect("read a head");
        assert!(n > 0, "nginx closed the connection after:\n{head}");
    }
    head
}

/// A stand-in for eventserver that serves a single connection (a second one is never
/// accepted): reads `requests` heads, answering each with `ok`, and returns them.
fn one_connection_upstream(requests: usize) -> (SocketAddr, thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("nginx connects");
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        (0..requests)
            .map(|_| {
                let head = read_head(&mut reader);
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .unwrap();
                head
            })
            .collect()
    });
    (addr, upstream)
}

/// nginx tells eventserver who the client is (appending the peer it saw to what the client
/// claimed) and that it came over TLS, speaks HTTP/1.1 upstream and keeps the connection
/// for the next request instead of opening one per request.
#[test]
fn nginx_forwards_the_client_and_scheme_on_one_kept_alive_connection() {
    let Some(nginx) = tools() else {
        return;
    };
    let (upstream, heads) = one_connection_upstream(2);
    let front = Nginx::start(&nginx, upstream);
    for claimed in ["203.0.113.9", "198.51.100.7"] {
        let got = curl(
            &front.url("/healthz"),
            &["--http2", "-H", &format!("X-Forwarded-For: {claimed}")],
        );
        assert_eq!(
            (got.status, got.body.as_str()),
            (200, "ok"),
            "answered on the first upstream connection: {got:?}"
        );
    }
    let heads = heads.join().expect("the upstream thread");
    for (head, claimed) in heads.iter().zip(["203.0.113.9", "198.51.100.7"]) {
        let lines: Vec<&str> = head.lines().collect();
        assert_eq!(lines[0], "GET /healthz HTTP/1.1", "{head}");
        let has = |line: &str| lines.iter().any(|l| l.eq_ignore_ascii_case(line));
        assert!(
            has(&format!("X-Forwarded-For: {claimed}, 127.0.0.1")),
            "{head}"
        );
        assert!(has("X-Forwarded-Proto: https"), "{head}");
        assert!(
            !lines
                .iter()
                .any(|l| l.to_ascii_lowercase().starts_with("connection:")),
            "no Connection header, so the connection stays open: {head}"
        );
    }
}

/// Bytes the peer of `conn` (a loopback connection) has received and not yet read, from
/// the kernel's table of IPv4 TCP sockets; `None` when the socket is not found.
fn unread_by_peer(conn: &TcpStream) -> Option<u64> {
    let hex = |addr: SocketAddr| match addr {
        SocketAddr::V4(a) => format!("{:08X}:{:04X}", u32::from(*a.ip()).swap_bytes(), a.port()),
        SocketAddr::V6(_) => unreachable!("the stand-in listens on IPv4"),
    };
    let (local, remote) = (hex(conn.peer_addr().ok()?), hex(conn.local_addr().ok()?));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let queues = (fields.get(1)? == &local && fields.get(2)? == &remote).then(|| fields[4])?;
        u64::from_str_radix(queues.split_once(':')?.1, 16).ok()
    })
}

/// A stand-in for eventserver that streams one answer: its head, then once nginx has read
/// the head an event-stream message, then the end of the answer (closing the connection)
/// when `finish` says so. What arrives with the head nginx passes on at once, so the message
/// comes later; and the answer has no length nor chunks, which a buffering nginx 1.22 would
/// hold until the end (chunks it passes on as they come, buffering or not).
fn streaming_upstream(finish: mpsc::Receiver<()>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("nginx connects");
        read_head(&mut BufReader::new(conn.try_clone().unwrap()));
        conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
              Connection: close\r\n\r\n",
        )
        .unwrap();
        wait_until(START, "nginx reads the answer's head", || {
            unread_by_peer(&conn) == Some(0)
        });
        conn.write_all(b"data: first\n\n").unwrap();
        // Finished, or the test hung up on failure: either way the answer ends here.
        let _ = finish.recv();
    });
    addr
}

/// curl, started with `args` on `url`, and what it prints as it arrives (read on a thread
/// of its own).
fn curl_streaming(url: &str, args: &[&str]) -> (std::process::Child, mpsc::Receiver<Vec<u8>>) {
    let mut client = Command::new("curl")
        .args(["-sS", "-k", "-N", "--max-time", "30"])
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    let mut out = client.stdout.take().unwrap();
    let (chunks, received) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = out.read(&mut buf) {
            if chunks.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    (client, received)
}

/// Adds what arrives to `seen` until it holds `needle`, within [`START`].
#[track_caller]
fn receive_until(received: &mpsc::Receiver<Vec<u8>>, seen: &mut Vec<u8>, needle: &str) {
    let deadline = Instant::now() + START;
    while !String::from_utf8_lossy(seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(chunk) => seen.extend(chunk),
            Err(_) => panic!(
                "{needle:?} did not arrive while the answer was open; got {:?}",
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

/// What eventserver writes reaches the client as it is written, not when the answer ends:
/// an event stream (and a long-poll answer) is never held in nginx's buffers.
#[test]
fn an_answer_reaches_the_client_as_eventserver_writes_it() {
    let Some(nginx) = tools() else {
        return;
    };
    let (finish, finished) = mpsc::channel();
    let front = Nginx::start(&nginx, streaming_upstream(finished));
    let (mut client, received) =
        curl_streaming(&front.url("/events?category=streamed"), &["--http2"]);
    receive_until(&received, &mut Vec::new(), "data: first\n\n");
    finish.send(()).unwrap();
    let status = client.wait().expect("curl exits");
    assert!(status.success(), "curl: {status}");
}

/// eventserver's own stream of events, over HTTP/2 through nginx: its messages arrive as
/// events are published, and nginx's idle timeout is well above the heartbeat.
#[test]
fn a_stream_of_events_over_http_2_passes_through_nginx() {
    let defaults = eventserver::Config::new("unused.db");
    assert!(seconds("proxy_read_timeout") > 2 * defaults.sse_heartbeat.as_secs());
    let Some((server, front)) = front() else {
        return;
    };
    let credentials = format!("{USER}:{PASSWORD}");
    let (mut client, received) = curl_streaming(
        &front.url("/events?category=sse-proxied"),
        &[
            "--http2",
            "-u",
            &credentials,
            "-H",
            "Accept: text/event-stream",
        ],
    );
    wait_until(START, "the stream is parked in eventserver", || {
        server.handle().parked() == 1
    });
    let mut seen = Vec::new();
    for n in 0..2 {
        let got = publish(&front, "--http2", "sse-proxied", &json!({ "n": n }));
        assert_eq!(got.status, 200, "{got:?}");
        receive_until(&received, &mut seen, &format!("\"data\":{{\"n\":{n}}}"));
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.starts_with("retry: 1000\n\nid: "), "{text:?}");
    assert_eq!(text.matches("\ndata: ").count(), 2, "{text:?}");
    client.kill().expect("stop curl");
    let _ = client.wait();
}
