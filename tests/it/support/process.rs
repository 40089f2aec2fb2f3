//! The real `eventserver` binary as a child process: spawned with a clean environment, its
//! output captured, its address read from the `listening on ADDR` log line, stopped
//! gracefully or killed, and killed and reaped when a test ends, passing or not.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::{PASSWORD, USER};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_eventserver");
/// How long a server may take to start, and an admin command to finish.
pub const START: Duration = Duration::from_secs(10);
/// How long a server may take to log its address: more than [`START`], since tests that
/// load the machine run alongside.
const LISTENING: Duration = Duration::from_secs(20);
/// How long a graceful shutdown may take ("exit 0 within a few seconds").
pub const SHUTDOWN: Duration = Duration::from_secs(5);

/// `program` with the test runner's environment kept out, as far as eventserver is
/// concerned: removes every variable the binary reads besides its arguments
/// (`EVENTSERVER_*`, systemd's `LISTEN_*`, `WATCHDOG_*`, `NOTIFY_SOCKET`,
/// `STATE_DIRECTORY`) and the two whose absence makes it restart itself with small thread
/// stacks and two malloc arenas, as in production.
pub fn clean(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name_str = name.to_string_lossy();
        let read = ["EVENTSERVER_", "LISTEN_", "WATCHDOG_"]
            .iter()
            .any(|prefix| name_str.starts_with(prefix))
            || [
                "NOTIFY_SOCKET",
                "STATE_DIRECTORY",
                "RUST_MIN_STACK",
                "MALLOC_ARENA_MAX",
            ]
            .contains(&name_str.as_ref());
        if read {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// The eventserver binary with `args` and `envs`.
pub fn eventserver(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = clean(BIN);
    cmd.args(args);
    cmd.envs(envs.iter().copied());
    cmd
}

/// The arguments of `serve --db DB --listen 127.0.0.1:0 EXTRA…`.
pub fn serve_args<'a>(db: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let db = db.to_str().expect("a UTF-8 database path");
    let mut args = vec!["serve", "--db", db, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    args
}

/// `serve --db DB --listen 127.0.0.1:0 EXTRA…` with `envs`, once it listens.
#[track_caller]
pub fn serve(db: &Path, extra: &[&str], envs: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let mut p = Proc::spawn(eventserver(&serve_args(db, extra), envs), None);
    let addr = p.listening();
    (p, addr)
}

/// A temporary directory with a database path in it; the database has the test user.
pub fn db_with_user() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("events.db");
    eventserver::admin::add_user(&db, USER, PASSWORD).expect("add user");
    (dir, db)
}

/// A finished command: its exit status and output.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Asserts a successful exit.
    #[track_caller]
    pub fn ok(self) -> Finished {
        assert!(
            self.status.success(),
            "command failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts exit status `code` and that stderr mentions `needle`.
    #[track_caller]
    pub fn fails(self, code: i32, needle: &str) -> Finished {
        assert_eq!(
            self.status.code(),
            Some(code),
            "exit status; stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr should mention {needle:?}:\n{}",
            self.stderr
        );
        self
    }
}

/// Runs the binary to completion (within [`START`]).
#[track_caller]
pub fn run(args: &[&str], envs: &[(&str, &str)], stdin: Option<&str>) -> Finished {
    let mut p = Proc::spawn(eventserver(args, envs), stdin);
    let status = p.wait_exit(START);
    Finished {
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
    }
}

/// Collects everything a child writes to one pipe.
fn collect(mut pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let reader = thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, reader)
}

/// A child process with captured stdout and stderr, killed on drop unless it has exited.
pub struct Proc {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with `stdin` (or none) and captured stdout and stderr.
    pub fn spawn(mut cmd: Command, stdin: Option<&str>) -> Proc {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            // The child may exit without reading; that is its answer, not a test failure.
            let _ = pipe.write_all(input.as_bytes());
        }
        let (out, r1) = collect(child.stdout.take().unwrap());
        let (err, r2) = collect(child.stderr.take().unwrap());
        Proc {
            child,
            out,
            err,
            readers: vec![r1, r2],
            exited: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// The exit status if the child has exited (reaping it).
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
            if self.exited.is_some() {
                self.join_readers();
            }
        }
        self.exited
    }

    /// The pipes close with the process: waits for their last bytes.
    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            reader.join().expect("a pipe reader");
        }
    }

    /// Whether the child still runs.
    pub fn alive(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Waits for the child to exit, failing the test (and killing it) after `within`.
    #[track_caller]
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.poll_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process {} still running after {within:?}; stderr:\n{}",
                self.pid(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a valid pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal(Signal::TERM);
    }

    /// SIGTERM, then asserts a clean exit (status 0) within `within`.
    #[track_caller]
    pub fn stop_within(&mut self, within: Duration) {
        self.terminate();
        let status = self.wait_exit(within);
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// SIGTERM, then asserts a clean exit (status 0) within [`SHUTDOWN`].
    #[track_caller]
    pub fn stop(&mut self) {
        self.stop_within(SHUTDOWN);
    }

    /// SIGKILL, then reaps it.
    pub fn kill9(&mut self) {
        self.signal(Signal::KILL);
        self.exited = Some(self.child.wait().expect("wait for the killed process"));
        self.join_readers();
    }

    /// Waits until stderr holds `needle`, failing if the process exits first.
    #[track_caller]
    pub fn wait_stderr(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let err = self.stderr();
            if err.contains(needle) {
                return err;
            }
            if let Some(status) = self.poll_exit() {
                let err = self.stderr();
                assert!(
                    err.contains(needle),
                    "exited ({status}) before logging {needle:?}; stderr:\n{err}"
                );
                return err;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr within {within:?}; stderr:\n{err}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until stdout holds `needle` (stdout and stderr are read by different threads,
    /// so what was printed first may show up last).
    #[track_caller]
    pub fn wait_stdout(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let out = self.stdout();
            if out.contains(needle) || self.poll_exit().is_some() {
                return self.stdout();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stdout within {within:?}; stdout:\n{out}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The address from the `listening on ADDR` start-up line.
    #[track_caller]
    pub fn listening(&mut self) -> SocketAddr {
        let err = self.wait_stderr("listening on ", LISTENING);
        let rest = &err[err.find("listening on ").unwrap() + "listening on ".len()..];
        let addr = rest.split_whitespace().next().unwrap_or_default();
        addr.parse()
            .unwrap_or_else(|_| panic!("bad address {addr:?} in log:\n{err}"))
    }

    /// A field of `/proc/<pid>/status` (kB for memory, a count for `Threads`); 0 once the
    /// process is gone.
    pub fn status(&self, field: &str) -> u64 {
        proc_status(self.pid(), field).unwrap_or(0)
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory.
    pub fn rss_mib(&self) -> f64 {
        self.status("VmRSS") as f64 / 1024.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            // What the process said is the first thing to read when a test fails.
            eprintln!(
                "stderr of process {} (last lines):\n{}",
                self.pid(),
                tail(&self.stderr())
            );
        }
    }
}

/// The last 60 lines of `log`.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// A field of `/proc/<pid>/status`.
pub fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
