//! The settings of `eventserver serve`, in one table: each row gives a flag (`--max-body`),
//! its environment variable (`EVENTSERVER_MAX_BODY`), its help line, the default it shows,
//! the [`Config`] field it sets and the rule that field must keep. The usage text, the
//! command-line parser, [`Config::validate`] and the README's configuration table (checked by
//! a test below) all come from [`SETTINGS`].
//!
//! Adding a setting: a [`Config`] field with its default in [`Config::new`], a row here, and
//! a row in the README's table (the test names what is missing).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, Engine, SyncMode};
use crate::error::Error;

/// One setting of `eventserver serve`.
pub struct Setting {
    /// The flag without its dashes, e.g. `max-body`.
    pub name: &'static str,
    /// What the value looks like in the usage text, e.g. `BYTES`.
    value: &'static str,
    /// One line for the usage text.
    help: &'static str,
    /// The default as words, where [`Config::new`]'s value does not say it (it depends on
    /// the machine, or there is none).
    default: Option<&'static str>,
    field: Field,
    rule: Rule,
}

/// The [`Config`] field a setting reads and writes.
struct Field {
    get: fn(&Config) -> &dyn Value,
    set: fn(&mut Config) -> &mut dyn Value,
}

/// The [`Field`] for `Config::$name`.
macro_rules! field {
    ($name:ident) => {
        Field {
            get: |c| &c.$name,
            set: |c| &mut c.$name,
        }
    };
}

/// A row of the table: the field, its name and value, its rule, its default in words
/// (`None`: [`Config::new`]'s value), its help line.
const fn row(
    field: Field,
    name: &'static str,
    value: &'static str,
    rule: Rule,
    default: Option<&'static str>,
    help: &'static str,
) -> Setting {
    Setting {
        name,
        value,
        help,
        default,
        field,
        rule,
    }
}

/// Every setting of `eventserver serve`, in the order the usage text and the README list them.
#[rustfmt::skip]
pub const SETTINGS: &[Setting] = &[
    row(field!(listen), "listen", "ADDR", Rule::Any, None, "address to bind"),
    row(field!(db), "db", "PATH|URL", Rule::Database,
        Some("./eventserver.db, or $STATE_DIRECTORY/eventserver.db"),
        "SQLite database file, or postgres://USER:PASS@HOST:PORT/DB"),
    row(field!(workers), "workers", "N", Rule::Count { min: 1, max: 1024 },
        Some("2 x cores"), "worker threads"),
    row(field!(queue), "queue", "N", POSITIVE, None, "requests waiting for a worker before 503"),
    row(field!(read_timeout), "read-timeout", "SECS", Rule::Seconds { min: 1, max: 3600 },
        None, "cut connections silent this long"),
    row(field!(max_body), "max-body", "BYTES", POSITIVE, None, "largest request body"),
    row(field!(max_limit), "max-limit", "N", POSITIVE, None, "largest streams-API limit"),
    row(field!(sync), "sync", "full|normal", Rule::Any, None, "commit durability"),
    row(field!(longpoll_max_timeout), "longpoll-max-timeout", "SECS",
        Rule::Seconds { min: 1, max: 86_400 }, None, "longest long-poll timeout"),
    row(field!(longpoll_max_batch), "longpoll-max-batch", "N", POSITIVE, None,
        "most events per long-poll answer"),
    row(field!(sse_lifetime), "sse-lifetime", "SECS", Rule::Seconds { min: 1, max: 86_400 },
        None, "how long a stream of events stays open before its client reconnects"),
    row(field!(sse_heartbeat), "sse-heartbeat", "SECS", Rule::Seconds { min: 1, max: 3600 },
        None, "comment line sent on an idle stream of events this often"),
    row(field!(max_parked), "max-parked", "N", POSITIVE,
        Some("from the open-files limit, at most 10,000"), "most parked long-polls"),
    row(field!(max_connections), "max-connections", "N", POSITIVE,
        Some("max-parked + 1,000, within the open-files limit"),
        "open connections before new requests get 503"),
    row(field!(events_path), "events-path", "PATH", Rule::Path, None, "long-poll subscribe path"),
    row(field!(publish_path), "publish-path", "PATH", Rule::Path, None, "long-poll publish path"),
    row(field!(write_queue), "write-queue", "N", POSITIVE, None,
        "writes queued for the writer before 503"),
    row(field!(retain_events), "retain-events", "N", Rule::KeepAllOrPositive, Some("keep all"),
        "keep at most N events per stream"),
    row(field!(retain_age), "retain-secs", "SECS", Rule::KeepAllOrPositive, Some("keep all"),
        "keep events younger than SECS"),
    row(field!(retain_acked_only), "retain-acked-only", "true|false", Rule::Any, None,
        "retention keeps what known consumers have not acknowledged"),
    row(field!(auth_cache_ttl), "auth-cache-secs", "SECS", Rule::Any, None,
        "how long a verified password is trusted"),
    row(field!(auth_failure_limit), "auth-failure-limit", "N", Rule::Any, None,
        "failed logins per minute per user and address before 429"),
    row(field!(auth_throttle_loopback), "auth-throttle-loopback", "true|false", Rule::Any, None,
        "throttle loopback clients too"),
    row(field!(metrics_auth), "metrics-auth", "true|false", Rule::Any, None,
        "whether GET /metrics needs credentials"),
    row(field!(public_subscribe), "public-subscribe", "PATTERNS", Rule::Any, Some("none"),
        "categories anyone may subscribe to, comma-separated"),
    row(field!(public_publish), "public-publish", "PATTERNS", Rule::Any, Some("none"),
        "categories anyone may publish to ('*' matches anything)"),
    row(field!(cors_origins), "cors-origins", "ORIGINS", Rule::Origins, Some("none"),
        "origins whose pages may call the APIs, or '*'"),
    row(field!(trusted_proxies), "trusted-proxies", "CIDRS", Rule::Any, Some("none"),
        "proxies whose X-Forwarded-For is believed, comma-separated"),
];

impl Setting {
    /// The command-line flag, e.g. `--max-body`.
    pub fn flag(&self) -> String {
        format!("--{}", self.name)
    }

    /// The environment variable, e.g. `EVENTSERVER_MAX_BODY`.
    pub fn var(&self) -> String {
        var_of(self.name)
    }

    /// The default as the usage text and the README show it.
    pub fn default_text(&self) -> String {
        match self.default {
            Some(words) => words.to_owned(),
            None => (self.field.get)(&Config::new(default_db())).show(),
        }
    }
}

/// The `--help` lines for the settings, one per setting with its default.
pub fn usage() -> String {
    const HELP_COLUMN: usize = 32;
    const WIDTH: usize = 90;
    let mut lines = String::new();
    for s in SETTINGS {
        let flag = format!("{} {}", s.flag(), s.value);
        let line = format!("  {flag:<width$} {}", s.help, width = HELP_COLUMN - 3);
        let default = format!("[{}]", s.default_text());
        // A long default goes under the help, where it cannot be taken for a flag.
        if line.len() + 1 + default.len() <= WIDTH {
            lines += &format!("{line} {default}\n");
        } else {
            lines += &format!("{line}\n{:HELP_COLUMN$}{default}\n", "");
        }
    }
    lines
}

/// The [`Config`] described by `flags` (name without dashes and value, as given on the
/// command line: the last of a name wins) and, for settings not given as flags, the
/// `EVENTSERVER_*` variables. An invalid value is an [`Error::Config`] naming the flag or
/// the variable it came from.
pub fn config(flags: &[(String, String)]) -> Result<Config, Error> {
    Ok(Given::from_env(flags).config()?)
}

/// The database `flags` and the environment name (`--db`, `EVENTSERVER_DB`), else
/// `eventserver.db` in systemd's state directory or the working directory. A PostgreSQL URL
/// the operator commands cannot use (one that does not parse, or any in a build without the
/// `postgres` feature) is an [`Error::Config`] naming where it came from.
pub fn db(flags: &[(String, String)]) -> Result<PathBuf, Error> {
    let given = Given::from_env(flags);
    let Some((source, text)) = given.value("db") else {
        return Ok(default_db());
    };
    let db = PathBuf::from(&text);
    let refusal = match Engine::of(&db) {
        Engine::Sqlite => None,
        Engine::Postgres => postgres_refusal(&text),
    };
    match refusal {
        Some(rule) => Err(Error::Config(Invalid {
            source,
            why: Why::Rule(rule),
        })),
        None => Ok(db),
    }
}

/// The environment variable of the setting `name`.
fn var_of(name: &str) -> String {
    format!("EVENTSERVER_{}", name.to_uppercase().replace('-', "_"))
}

/// The database without `--db`: under systemd, in its state directory (the first, if it
/// lists several separated by ':'), else in the working directory.
fn default_db() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        Some(dirs) => {
            let dirs = dirs.to_string_lossy().into_owned();
            let first = dirs.split(':').next().unwrap_or_default().to_owned();
            PathBuf::from(first).join("eventserver.db")
        }
        None => PathBuf::from("eventserver.db"),
    }
}

/// Setting values as given: flags, then the environment (passed in, so tests need not set
/// the process's).
struct Given<'a> {
    flags: &'a [(String, String)],
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Given<'a> {
    fn from_env(flags: &'a [(String, String)]) -> Given<'a> {
        Given {
            flags,
            env: &|var| std::env::var(var).ok(),
        }
    }

    /// Where the setting `name` came from (its flag or its variable) and its value, if it
    /// was given; a variable is not even read when the flag is there.
    fn value(&self, name: &str) -> Option<(String, String)> {
        if let Some((_, v)) = self.flags.iter().rev().find(|(n, _)| n == name) {
            return Some((format!("--{name}"), v.clone()));
        }
        let var = var_of(name);
        (self.env)(&var).map(|v| (var, v))
    }

    fn config(&self) -> Result<Config, Invalid> {
        let mut config = Config::new(default_db());
        for setting in SETTINGS {
            if let Some((source, text)) = self.value(setting.name) {
                (setting.field.set)(&mut config)
                    .set(&text)
                    .map_err(|more| Invalid {
                        source: source.clone(),
                        why: Why::Unparsable { value: text, more },
                    })?;
            }
        }
        // The default connection cap follows the parked-poll cap it makes room for.
        if self.value("max-connections").is_none() {
            config.max_connections = Config::connections_for(config.max_parked);
        }
        check(&config).map_err(|mut invalid| {
            // Named as given: a value from the environment by its variable.
            let name = invalid.source.trim_start_matches('-').to_owned();
            if let Some((source, _)) = self.value(&name) {
                invalid.source = source;
            }
            invalid
        })?;
        Ok(config)
    }
}

/// A setting that was refused: where its value came from, and why. Its message is the one
/// `eventserver` prints, e.g. `EVENTSERVER_WORKERS must be at least 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The flag (`--workers`) or, for a value taken from the environment, the variable
    /// (`EVENTSERVER_WORKERS`); the flag for a field an embedder set in code.
    pub source: String,
    /// What is wrong with it.
    pub why: Why,
}

/// What is wrong with a setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Its text does not parse as the setting's type.
    Unparsable {
        /// The text given.
        value: String,
        /// What to add to the message (e.g. `": use full or normal"`), often nothing.
        more: &'static str,
    },
    /// It parses, but breaks the setting's rule (the text says which, e.g.
    /// `must be at least 1`).
    Rule(String),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.why {
            Why::Unparsable { value, more } => {
                write!(f, "invalid value {value:?} for {}{more}", self.source)
            }
            Why::Rule(rule) => write!(f, "{} {rule}", self.source),
        }
    }
}

impl std::error::Error for Invalid {}

/// Checks every setting against its rule, then the one rule between two settings.
pub(crate) fn check(config: &Config) -> Result<(), Invalid> {
    let broken = |name: &str, rule: String| Invalid {
        source: format!("--{name}"),
        why: Why::Rule(rule),
    };
    for setting in SETTINGS {
        if let Some(rule) = setting.rule.broken_by((setting.field.get)(config)) {
            return Err(broken(setting.name, rule));
        }
    }
    if config.events_path == config.publish_path {
        return Err(broken(
            "events-path",
            "and --publish-path must differ".into(),
        ));
    }
    Ok(())
}

/// What a setting's value must be.
enum Rule {
    /// Anything its type parses.
    Any,
    /// A number from `min` to `max`.
    Count { min: u64, max: u64 },
    /// Whole seconds from `min` to `max`.
    Seconds { min: u64, max: u64 },
    /// Unset (keep everything), or at least 1.
    KeepAllOrPositive,
    /// A path of the server's own: starts with '/', no query, outside the streams API.
    Path,
    /// Comma-separated `*` or origins as browsers send them: `scheme://host[:port]`.
    Origins,
    /// A SQLite file, or a PostgreSQL URL this build can use ([`postgres_refusal`]).
    Database,
}

/// At least 1: a zero queue, body or batch would refuse everything.
const POSITIVE: Rule = Rule::Count {
    min: 1,
    max: u64::MAX,
};

impl Rule {
    /// Why `value` breaks this rule, if it does.
    fn broken_by(&self, value: &dyn Value) -> Option<String> {
        match *self {
            Rule::Any => None,
            Rule::Count { min, .. } if !value.within(min, u64::MAX) => {
                Some(format!("must be at least {min}"))
            }
            Rule::Count { max, .. } if !value.within(0, max) => {
                Some(format!("must be at most {max}"))
            }
            Rule::Count { .. } => None,
            Rule::Seconds { min, max } => {
                (!value.within(min, max)).then(|| format!("must be {min}-{max} seconds"))
            }
            Rule::KeepAllOrPositive => (!value.within(1, u64::MAX))
                .then(|| "must be at least 1 (leave it unset to keep everything)".into()),
            Rule::Path => {
                let path = value.show();
                (!path.starts_with('/') || path.contains('?') || path.starts_with("/api/"))
                    .then(|| "must start with '/', hold no '?', and lie outside /api/".into())
            }
            Rule::Origins => value
                .show()
                .split(',')
                .filter(|o| !o.is_empty())
                .find_map(|origin| {
                    let host = origin.split_once("://").map_or("", |(_, host)| host);
                    let bare = !host.is_empty() && !host.contains(['/', '?', '#', ' ']);
                    (origin != "*" && !bare)
                        .then(|| format!("has {origin:?}: use scheme://host[:port], or *"))
                }),
            Rule::Database => match Engine::of(Path::new(&value.show())) {
                Engine::Sqlite => None,
                Engine::Postgres => postgres_refusal(&value.show()),
            },
        }
    }
}

/// Why this build refuses the PostgreSQL URL `url`: it was built without the client. The
/// message never quotes the URL, which may hold a password.
#[cfg(not(feature = "postgres"))]
fn postgres_refusal(_url: &str) -> Option<String> {
    Some(
        "names a PostgreSQL database, which this build cannot use: build eventserver with \
         `cargo build --release --features postgres`"
            .into(),
    )
}

/// Why this build refuses the PostgreSQL URL `url`: it does not parse. The message never
/// quotes the URL, which may hold a password.
#[cfg(feature = "postgres")]
fn postgres_refusal(url: &str) -> Option<String> {
    let why = crate::store::pg::check_url(url).err()?;
    Some(format!(
        "is not a PostgreSQL URL eventserver can use: {why}"
    ))
}

/// A [`Config`] field as a setting: parsed from and shown as command-line text.
trait Value {
    /// Parses `text` into the field; on failure, what to add to "invalid value" (often
    /// nothing).
    fn set(&mut self, text: &str) -> Result<(), &'static str>;
    /// The value as it would be given.
    fn show(&self) -> String;
    /// Whether the value lies from `min` to `max`; values that are not numbers always do.
    fn within(&self, _min: u64, _max: u64) -> bool {
        true
    }
}

/// A type whose command-line text is its `FromStr` and `Display` text; `within` for numbers.
macro_rules! parsed_value {
    ($ty:ty $(, $within:item)?) => {
        impl Value for $ty {
            fn set(&mut self, text: &str) -> Result<(), &'static str> {
                *self = text.parse().map_err(|_| "")?;
                Ok(())
            }
            fn show(&self) -> String {
                self.to_string()
            }
            $($within)?
        }
    };
}

/// A number, which rules can bound.
macro_rules! number_value {
    ($ty:ty) => {
        parsed_value!(
            $ty,
            fn within(&self, min: u64, max: u64) -> bool {
                u64::try_from(*self).is_ok_and(|n| (min..=max).contains(&n))
            }
        );
    };
}

parsed_value!(bool);
parsed_value!(SocketAddr);
parsed_value!(String);
number_value!(usize);
number_value!(u64);
number_value!(u32);

impl Value for PathBuf {
    fn set(&mut self, text: &str) -> Result<(), &'static str> {
        *self = PathBuf::from(text);
        Ok(())
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
}

/// Whole seconds.
impl Value for Duration {
    fn set(&mut self, text: &str) -> Result<(), &'static str> {
        *self = Duration::from_secs(text.parse().map_err(|_| "")?);
        Ok(())
    }
    fn show(&self) -> String {
        self.as_secs().to_string()
    }
    fn within(&self, min: u64, max: u64) -> bool {
        (Duration::from_secs(min)..=Duration::from_secs(max)).contains(self)
    }
}

impl Value for SyncMode {
    fn set(&mut self, text: &str) -> Result<(), &'static str> {
        *self = match text {
            "full" => SyncMode::Full,
            "normal" => SyncMode::Normal,
            _ => return Err(": use full or normal"),
        };
        Ok(())
    }
    fn show(&self) -> String {
        match self {
            SyncMode::Full => "full",
            SyncMode::Normal => "normal",
        }
        .into()
    }
}

/// Unset by default; giving the setting sets it.
impl<T: Value + Default> Value for Option<T> {
    fn set(&mut self, text: &str) -> Result<(), &'static str> {
        let mut value = T::default();
        value.set(text)?;
        *self = Some(value);
        Ok(())
    }
    fn show(&self) -> String {
        self.as_ref().map(T::show).unwrap_or_default()
    }
    fn within(&self, min: u64, max: u64) -> bool {
        self.as_ref().is_none_or(|v| v.within(min, max))
    }
}

/// A comma-separated list (patterns, origins, address blocks); blanks around items and
/// empty ones are dropped.
impl<T: std::str::FromStr + std::fmt::Display> Value for Vec<T> {
    fn set(&mut self, text: &str) -> Result<(), &'static str> {
        let items = text.split(',').map(str::trim).filter(|p| !p.is_empty());
        *self = items
            .map(|item| item.parse().map_err(|_| ""))
            .collect::<Result<_, _>>()?;
        Ok(())
    }
    fn show(&self) -> String {
        let items: Vec<String> = self.iter().map(T::to_string).collect();
        items.join(",")
    }
}

#[cfg(test)]
mod tests;
