//! The settings table against the README, the parser and the rules.

use super::*;

/// `flags` as the command line gives them, over the variables in `env`.
fn config(flags: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Config, Invalid> {
    let flags: Vec<(String, String)> = flags
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let lookup = |var: &str| {
        env.iter()
            .find(|(n, _)| *n == var)
            .map(|(_, v)| v.to_string())
    };
    Given {
        flags: &flags,
        env: &lookup,
    }
    .config()
}

#[test]
fn the_readme_lists_every_setting_with_its_flag_variable_and_default() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("a '## Configuration' section");
    // The section's first table, past its header and separator lines; code marks aside.
    let rows: Vec<Vec<String>> = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells = l.split('|').skip(1).take(3);
            cells.map(|c| c.trim().replace('`', "")).collect()
        })
        .collect();
    let expected: Vec<Vec<String>> = SETTINGS
        .iter()
        .map(|s| vec![s.flag(), s.var(), s.default_text()])
        .collect();
    for (row, setting) in rows.iter().zip(&expected) {
        assert_eq!(row, setting, "README row (flag, environment, default)");
    }
    assert_eq!(rows.len(), expected.len(), "README rows: {rows:?}");
}

#[test]
fn every_setting_shows_a_default_and_the_defaults_pass_the_rules() {
    for s in SETTINGS {
        assert!(!s.default_text().is_empty(), "{} shows no default", s.name);
    }
    assert_eq!(Config::new("x.db").validate(), Ok(()));
}

#[test]
fn a_flag_wins_over_its_variable_which_is_not_even_parsed() {
    let env = [("EVENTSERVER_WORKERS", "x"), ("EVENTSERVER_QUEUE", "7")];
    let c = config(&[("workers", "3"), ("workers", "5")], &env).unwrap();
    assert_eq!((c.workers, c.queue), (5, 7));
    let c = config(&[("sync", "normal"), ("retain-secs", "60")], &[]).unwrap();
    assert_eq!(c.sync, SyncMode::Normal);
    assert_eq!(c.retain_age, Some(Duration::from_secs(60)));
    let c = config(&[("public-publish", " a*, ,b ")], &[]).unwrap();
    assert_eq!(c.public_publish, ["a*", "b"]);
    let c = config(
        &[("cors-origins", "https://a.example, http://b:8080,*")],
        &[],
    )
    .unwrap();
    assert_eq!(c.cors_origins, ["https://a.example", "http://b:8080", "*"]);
    let c = config(&[], &[("EVENTSERVER_TRUSTED_PROXIES", "10.0.0.0/8, ::1")]).unwrap();
    let shown: Vec<String> = c.trusted_proxies.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["10.0.0.0/8", "::1/128"]);
}

#[test]
fn errors_name_the_flag_or_variable_the_value_came_from() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [(&'a str, &'a str)], &'a str);
    #[rustfmt::skip]
    let cases: [Case; 11] = [
        (&[("workers", "abc")], &[], "invalid value \"abc\" for --workers"),
        (&[], &[("EVENTSERVER_SYNC", "maybe")],
            "invalid value \"maybe\" for EVENTSERVER_SYNC: use full or normal"),
        (&[], &[("EVENTSERVER_WORKERS", "0")], "EVENTSERVER_WORKERS must be at least 1"),
        (&[("workers", "2000")], &[], "--workers must be at most 1024"),
        (&[("read-timeout", "0")], &[], "--read-timeout must be 1-3600 seconds"),
        (&[], &[("EVENTSERVER_RETAIN_EVENTS", "0")],
            "EVENTSERVER_RETAIN_EVENTS must be at least 1 (leave it unset to keep everything)"),
        (&[("publish-path", "/api/p")], &[],
            "--publish-path must start with '/', hold no '?', and lie outside /api/"),
        (&[("publish-path", "/x")], &[("EVENTSERVER_EVENTS_PATH", "/x")],
            "EVENTSERVER_EVENTS_PATH and --publish-path must differ"),
        (&[("cors-origins", "https://a.example/app")], &[],
            "--cors-origins has \"https://a.example/app\": use scheme://host[:port], or *"),
        (&[], &[("EVENTSERVER_CORS_ORIGINS", "a.example")],
            "EVENTSERVER_CORS_ORIGINS has \"a.example\": use scheme://host[:port], or *"),
        (&[("trusted-proxies", "10.0.0.0/40")], &[],
            "invalid value \"10.0.0.0/40\" for --trusted-proxies"),
    ];
    for (flags, env, message) in cases {
        assert_eq!(config(flags, env).unwrap_err().to_string(), message);
    }
}

#[test]
fn the_connection_cap_follows_max_parked_unless_it_is_given() {
    let c = config(&[("max-parked", "100")], &[]).unwrap();
    assert_eq!(c.max_connections, Config::connections_for(100));
    let c = config(&[("max-parked", "100"), ("max-connections", "7")], &[]).unwrap();
    assert_eq!(c.max_connections, 7);
}

/// Embedders set fields directly; `validate` names the setting by its flag.
#[test]
fn validate_names_the_flag_of_a_field_out_of_bounds() {
    let mut c = Config::new("x.db");
    c.max_body = 0;
    let message = |c: &Config| c.validate().map_err(|e| e.to_string());
    assert_eq!(message(&c), Err("--max-body must be at least 1".into()));
    let mut c = Config::new("x.db");
    c.longpoll_max_timeout = 86_401;
    assert_eq!(
        message(&c),
        Err("--longpoll-max-timeout must be 1-86400 seconds".into())
    );
    c.longpoll_max_timeout = 110;
    c.retain_age = Some(Duration::ZERO);
    assert_eq!(
        message(&c),
        Err("--retain-secs must be at least 1 (leave it unset to keep everything)".into())
    );
}
