//! A throwaway PostgreSQL cluster (Debian's `postgresql` package) for one test: `initdb`
//! into a temporary directory, a server on a free port of 127.0.0.1 with its unix socket in
//! that directory, stopped (`pg_ctl stop -m immediate`) and removed when dropped.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then every PostgreSQL program
//! runs through `runuser -u postgres` (the account Debian's package creates; `nobody` where
//! there is none), and the temporary directory is handed to that account. Clients connect
//! over TCP as the cluster's superuser [`Postgres::USER`] with a password (SCRAM), as a
//! node would; `psql` connects over the socket, where the cluster trusts local users.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// A running cluster, stopped and removed on drop.
pub struct Postgres {
    bin: PathBuf,
    /// The account PostgreSQL runs as, when the tests run as root.
    run_as: Option<String>,
    port: u16,
    dir: tempfile::TempDir,
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
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: PostgreSQL is not installed (CI must install it: apt-get install \
                 postgresql)"
            );
            eprintln!("SKIPPED {test}: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        Some(Postgres::start(bin))
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
            let options = format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {}",
                cluster.port,
                cluster.dir.path().display()
            );
            let log = cluster.dir.path().join("postgres.log");
            let started = cluster.output(
                "pg_ctl",
                &[
                    "start".as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-o".as_ref(),
                    options.as_ref(),
                ],
            );
            if started.status.success() {
                break;
            }
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                attempt < 5,
                "PostgreSQL did not start: {}\n{log}",
                String::from_utf8_lossy(&started.stderr)
            );
        }
        cluster
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

    /// Runs the PostgreSQL program `program` as the cluster's account.
    fn output(&self, program: &str, args: &[&std::ffi::OsStr]) -> Output {
        let path = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(account) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", account, "--"]).arg(&path);
                cmd
            }
            None => Command::new(&path),
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", path.display()))
    }

    /// Like [`Postgres::output`], failing the test unless the program succeeds.
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) {
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
        let data = self.data();
        // Nothing of the cluster is kept, so it need not shut down cleanly.
        let stopped = self.output(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        );
        if !stopped.status.success() {
            eprintln!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&stopped.stderr)
            );
        }
    }
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
