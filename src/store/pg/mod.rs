//! The durable log on PostgreSQL (cargo feature `postgres`): the only module that names the
//! `postgres` crate, so that several eventserver nodes can share one database.
//!
//! What is here so far: checking a `--db postgres://…` URL ([`check_url`]). The server does
//! not run on PostgreSQL yet: the settings refuse such a URL until it does.

use postgres::config::SslMode;

/// Why `url` is not a PostgreSQL URL eventserver can connect with, if it is not. The
/// reasons name options, never values, so they carry no password.
pub fn check_url(url: &str) -> Result<(), String> {
    let config: postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| format!("the URL does not parse ({e})"))?;
    if config.get_user().is_none() {
        return Err("the URL names no user".into());
    }
    if config.get_hosts().is_empty() {
        return Err("the URL names no host".into());
    }
    // TLS needs a TLS library this build does not carry yet.
    if config.get_ssl_mode() == SslMode::Require {
        return Err("sslmode=require is not supported yet".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_eventserver_cannot_use_is_refused_without_quoting_its_password() {
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
}
