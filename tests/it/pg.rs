//! PostgreSQL: how `--db postgres://…` is taken in either build.

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
