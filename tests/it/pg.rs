//! PostgreSQL: how `--db postgres://…` is taken in either build, and, with the `postgres`
//! feature, a real throwaway cluster ([`Postgres`]) to test the store against.

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
mod cluster {
    use std::os::unix::fs::MetadataExt;

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
        let backend: u32 = pg
            .psql("postgres", "SELECT pg_backend_pid()")
            .parse()
            .unwrap();
        let uid = proc_status(backend, "Uid").expect("the backend's status");
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
}
