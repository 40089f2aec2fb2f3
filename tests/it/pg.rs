//! PostgreSQL: how `--db postgres://…` is taken in either build, and, with the `postgres`
//! feature, the store's contracts for several nodes against a real throwaway cluster
//! ([`Postgres`]): migrations run once when nodes start together, and a newer schema is
//! refused.
//!
//! Each "node" is a thread with a connection of its own ([`eventserver::pg::Database`]):
//! to PostgreSQL, that is exactly what two processes are.

use crate::support::run;

/// A URL whose password must never be printed.
const URL: &str = "postgres://app:s3cret-pw@127.0.0.1:1/events";

/// `serve` and an operator command given `url` (as a flag, then in `EVENTSERVER_DB`) exit
/// 2 with `needle` on stderr, never showing the password.
#[track_caller]
fn refused(url: &str, needle: &str) {
    let flag = run(
        &["serve", "--db", url, "--listen", "127.0.0.1:0"],
        &[],
        None,
    );
    let flag = flag.fails(2, needle);
    assert!(flag.stderr.contains("--db "), "{}", flag.stderr);
    let env = run(&["user", "list"], &[("EVENTSERVER_DB", url)], None);
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
        refused(url, "cargo build --release --features postgres");
    }
}

#[cfg(feature = "postgres")]
#[test]
fn a_postgres_url_is_refused_until_the_server_runs_on_it() {
    refused(URL, "does not serve from it yet");
    refused(
        "postgres://app:s3cret@db/events?sslmode=require",
        "sslmode=require is not supported yet",
    );
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
    use std::os::unix::fs::MetadataExt;
    use std::sync::{Arc, Barrier};
    use std::thread;

    use eventserver::pg::{Database, PgError};

    use crate::support::{Postgres, proc_status};

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
}
