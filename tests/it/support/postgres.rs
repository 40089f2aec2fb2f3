//! A throwaway PostgreSQL cluster (Debian's `postgresql` package): `initdb` into a
//! temporary directory, a server on a free port of 127.0.0.1 with its unix socket in that
//! directory, stopped (`pg_ctl stop -m immediate`) and removed when dropped. One test
//! starts one of its own ([`Postgres::start_or_skip`]) when it stops or restarts the server;
//! the others share the test process's cluster ([`Postgres::shared_or_skip`]), a database
//! each ([`Database`]): `initdb` and a start cost most of a second, a database a few
//! milliseconds.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then every PostgreSQL program
//! runs through `runuser -u postgres` (the account Debian's package creates; `nobody` where
//! there is none), and the temporary directory is handed to that account. Clients connect
//! over TCP as the cluster's superuser [`Postgres::USER`] with a password (SCRAM), as a
//! node would; `psql` connects over the socket, where the cluster trusts local users.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A running cluster, stopped and removed on drop.
pub struct Postgres {
    bin: PathBuf,
    /// The account PostgreSQL runs as, when the tests run as root.
    run_as: Option<String>,
    port: u16,
    dir: tempfile::TempDir,
    /// The shared cluster's reaper, whose stdin is the pipe it waits on.
    _reaper: Option<Child>,
}

impl Postgres {
    /// The cluster's superuser, whom every URL names.
    pub const USER: &'static str = "eventserver";
    /// [`Postgres::USER`]'s password.
    pub const PASSWORD: &'static str = "pg s3cret";

    /// Starts a cluster; `None`, after saying why on stderr, when PostgreSQL is not
    /// installed and this is not CI (in CI, where `.ci/run` installs it, its absence fails
    /// the test).
    pub fn start_or_skip(test: &str) -> Option<Postgres> {
        match bin_dir() {
            Some(bin) => Some(Postgres::start(bin)),
            None => not_installed(test),
        }
    }

    /// The cluster every test of this process shares, started on first use; `None` as for
    /// [`Postgres::start_or_skip`]. A static is never dropped, so a reaper process stops and
    /// removes the cluster once the test process has exited, however it exits.
    pub fn shared_or_skip(test: &str) -> Option<&'static Postgres> {
        static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| bin_dir().map(|bin| Postgres::start(bin).reaped()));
        match shared {
            Some(cluster) => Some(cluster),
            None => not_installed(test),
        }
    }

    fn start(bin: PathBuf) -> Postgres {
        // In /tmp whatever TMPDIR says: the account PostgreSQL runs as must reach it, and
        // the socket's path must stay within the 107 bytes a unix socket's name may have.
        let dir = tempfile::Builder::new()
            .prefix("eventserver-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let run_as = running_as_root().then(postgres_account);
        let password = dir.path().join("password");
        std::fs::write(&password, Postgres::PASSWORD).expect("password file");
        if let Some(account) = &run_as {
            let (uid, gid) = ids_of(account);
            for path in [dir.path(), &password] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
            }
        }
        let mut cluster = Postgres {
            bin,
            run_as,
            port: 0,
            dir,
            _reaper: None,
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                Postgres::USER.as_ref(),
                format!("--pwfile={}", password.display()).as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                "--auth-local=trust".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--no-locale".as_ref(),
                // A throwaway cluster need not survive a power cut.
                "--no-sync".as_ref(),
            ],
        );
        // Another process may take the free port before the server binds it: try again.
        for attempt in 1.. {
            cluster.port = free_port();
            let started = cluster.pg_ctl_start();
            if started.status.success() {
                break;
            }
            assert!(attempt < 5, "{}", cluster.start_failure(&started));
        }
        cluster
    }

    /// `pg_ctl start` on the cluster's port, waiting until it accepts connections.
    fn pg_ctl_start(&self) -> Output {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.path().display()
        );
        self.output(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-D".as_ref(),
                self.data().as_os_str(),
                "-l".as_ref(),
                self.log().as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
            ],
        )
    }

    /// What a failed `pg_ctl start` said, with the server's log.
    fn start_failure(&self, started: &Output) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        format!(
            "PostgreSQL did not start: {}\n{log}",
            String::from_utf8_lossy(&started.stderr)
        )
    }

    /// Stops the server (`pg_ctl stop -m MODE`: `fast` or `immediate`) and waits until it
    /// is gone; its data stay, for [`Postgres::restart`].
    pub fn stop(&self, mode: &str) {
        self.run("pg_ctl", &self.stop_args(mode));
    }

    /// Starts the stopped server again on the same port and data.
    pub fn restart(&self) {
        let started = self.pg_ctl_start();
        assert!(started.status.success(), "{}", self.start_failure(&started));
    }

    /// The arguments of `pg_ctl stop -m MODE`, waiting.
    fn stop_args(&self, mode: &str) -> Vec<std::ffi::OsString> {
        let mut args = Vec::from(["stop", "-m", mode, "-w", "-D"].map(Into::into));
        args.push(self.data().into());
        args
    }

    /// Hands the cluster to a reaper: a shell in a process group of its own (so that a ^C
    /// to the tests does not end it first) that waits for the end of a pipe only this
    /// process holds, then stops the server and removes its directory.
    fn reaped(mut self) -> Postgres {
        let mut stop = self.command("pg_ctl");
        stop.args(self.stop_args("immediate"));
        let mut reaper = Command::new("sh");
        reaper
            .args([
                "-c",
                "cat >/dev/null; \"$@\"; rm -rf \"$CLUSTER\"",
                "reaper",
            ])
            .arg(stop.get_program())
            .args(stop.get_args())
            .env("CLUSTER", self.dir.path())
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self._reaper = Some(reaper.spawn().expect("spawn the cluster's reaper"));
        self
    }

    /// The URL of `database` on this cluster, with the superuser's name and password.
    pub fn url(&self, database: &str) -> String {
        let password = Postgres::PASSWORD.replace(' ', "%20");
        format!(
            "postgres://{}:{password}@127.0.0.1:{}/{database}",
            Postgres::USER,
            self.port
        )
    }

    /// Creates an empty database called `name` and returns its URL.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Runs `sql` in `database` with `psql` and returns what it printed: unaligned rows,
    /// fields separated by '|', no headers. Fails the test if psql fails.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let psql = self.bin.join("psql");
        let out = Command::new(&psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                Postgres::USER,
                "-d",
                database,
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", psql.display()));
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The PostgreSQL program `program`, to run as the cluster's account.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(account) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", account, "--"]).arg(&path);
                cmd
            }
            None => Command::new(&path),
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    /// Runs the PostgreSQL program `program` as the cluster's account.
    fn output(&self, program: &str, args: &[impl AsRef<std::ffi::OsStr>]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// Like [`Postgres::output`], failing the test unless the program succeeds.
    fn run(&self, program: &str, args: &[impl AsRef<std::ffi::OsStr>]) {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Nothing of the cluster is kept, so it need not shut down cleanly.
        let stopped = self.output("pg_ctl", &self.stop_args("immediate"));
        if !stopped.status.success() {
            eprintln!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&stopped.stderr)
            );
        }
    }
}

/// A database of its own on the shared cluster, dropped (with whatever still connects to
/// it) when this is.
pub struct Database {
    cluster: &'static Postgres,
    name: String,
}

impl Database {
    /// A fresh database on the shared cluster; `None` as for [`Postgres::start_or_skip`].
    pub fn fresh_or_skip(test: &str) -> Option<Database> {
        static CREATED: AtomicUsize = AtomicUsize::new(0);
        let cluster = Postgres::shared_or_skip(test)?;
        let name = format!("test{}", CREATED.fetch_add(1, Ordering::Relaxed));
        cluster.database(&name);
        Some(Database { cluster, name })
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    /// Runs `sql` in it, as [`Postgres::psql`] does.
    pub fn psql(&self, sql: &str) -> String {
        self.cluster.psql(&self.name, sql)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let drop = format!("DROP DATABASE \"{}\" WITH (FORCE)", self.name);
        self.cluster.psql("postgres", &drop);
    }
}

/// Skips a test for want of PostgreSQL, or fails it in CI, where it must be installed.
fn not_installed<T>(test: &str) -> Option<T> {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: PostgreSQL is not installed (CI must install it: apt-get install postgresql)"
    );
    eprintln!("SKIPPED {test}: PostgreSQL is not installed (apt-get install postgresql)");
    None
}

/// The directory of PostgreSQL's server programs: Debian's newest
/// `/usr/lib/postgresql/<version>/bin`, else wherever `initdb` is on the PATH.
fn bin_dir() -> Option<PathBuf> {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            versions
                .filter_map(|entry| entry.ok())
                .filter_map(|entry| {
                    let version: u32 = entry.file_name().to_str()?.parse().ok()?;
                    let bin = entry.path().join("bin");
                    bin.join("initdb").is_file().then_some((version, bin))
                })
                .max()
                .map(|(_, bin)| bin)
        });
    debian.or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).find(|dir| dir.join("initdb").is_file())
    })
}

fn running_as_root() -> bool {
    id(&["-u"]) == 0
}

/// The account PostgreSQL runs as under root: `postgres` if it exists, else `nobody`.
fn postgres_account() -> String {
    let exists = Command::new("id")
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match exists {
        true => "postgres".into(),
        false => "nobody".into(),
    }
}

/// The user and group ids of `account`.
fn ids_of(account: &str) -> (u32, u32) {
    (id(&["-u", account]), id(&["-g", account]))
}

/// A number `id ARGS` prints.
fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("run id");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {args:?} printed {text:?}"))
}

/// A port of 127.0.0.1 nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}
