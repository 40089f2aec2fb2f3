//! The `eventserver` command: argv and environment to [`Config`], signals, exit codes.
//! Everything it does goes through the library's public API.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use eventserver::{Config, Server, SyncMode, admin, log};

const USAGE: &str = "\
eventserver — a small, fast, durable HTTP event server

Usage:
  eventserver [serve] [OPTIONS]        run the server (the default)
  eventserver user add NAME [--produce PATTERNS] [--consume PATTERNS] [--db PATH]
                                      add (or update) a user; the password is the first
                                      line of stdin; patterns are comma-separated stream
                                      names with '*' wildcards [default: '*', everything]
  eventserver user list [--db PATH]
  eventserver user remove NAME [--db PATH]
  eventserver stream list [--db PATH]
  eventserver stream show STREAM [--db PATH]     owner, events, consumers with offsets and lag
  eventserver stream release STREAM [--db PATH]  clear the producer lock
  eventserver consumer reset STREAM CONSUMER EVENT_NAME OFFSET [--db PATH]
  eventserver backup PATH [--db PATH]            consistent copy, safe while serving
  eventserver --version | --help

Serve options (each also an environment variable, EVENTSERVER_<NAME>; flags win):
  --listen ADDR                 address to bind            [127.0.0.1:8080]
  --db PATH                     SQLite database file       [./eventserver.db, or
                                                            $STATE_DIRECTORY/eventserver.db]
  --workers N                   worker threads             [2 x cores]
  --queue N                     requests waiting for a worker before 503 [16384]
  --max-body BYTES              largest request body       [1048576]
  --read-timeout SECS           cut connections silent this long [120]
  --max-limit N                 largest streams-API limit  [1000]
  --sync full|normal            commit durability          [full]
  --longpoll-max-timeout SECS   longest long-poll timeout  [110]
  --longpoll-max-batch N        most events per long-poll answer [250]
  --max-parked N                most parked long-polls     [from the open-files limit]
  --max-connections N           open connections before new requests get 503
                                                           [max-parked + 1000]
  --events-path PATH            long-poll subscribe path   [/events]
  --publish-path PATH           long-poll publish path     [/publish]
  --write-queue N               writes queued for the writer before 503 [16384]
  --retain-events N             keep at most N events per stream [keep all]
  --retain-secs SECS            keep events younger than SECS    [keep all]
  --auth-cache-secs SECS        how long a verified password is trusted [30]
  --auth-failure-limit N        failed logins per minute per client before 429 [10]
  --auth-throttle-loopback true|false  throttle loopback clients too [false]
  --metrics-auth true|false     whether GET /metrics needs credentials [true]
  --public-subscribe PATTERNS   categories anyone may subscribe to, comma-separated,
                                '*' matches anything      [none]
  --public-publish PATTERNS     categories anyone may publish to [none]

Admin commands work on the database file and are safe while the server runs.
Under systemd (Type=notify) it reports READY/STOPPING/WATCHDOG and adopts a socket passed
by socket activation (LISTEN_FDS) instead of binding --listen.
";

/// A command-line mistake: exit status 2 with this message.
struct Usage(String);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("eventserver: {m}\nRun 'eventserver --help' for usage.");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            log::error(&m);
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<Usage> for Failure {
    fn from(u: Usage) -> Failure {
        Failure::Usage(u.0)
    }
}

impl From<eventserver::Error> for Failure {
    fn from(e: eventserver::Error) -> Failure {
        match e {
            eventserver::Error::Config(m) => Failure::Usage(m),
            eventserver::Error::Admin(refusal) => Failure::Usage(refusal.to_string()),
            other => Failure::Runtime(other.to_string()),
        }
    }
}

fn run(args: &[String]) -> Result<(), Failure> {
    log::init_from_env().map_err(Failure::Usage)?;
    match args.first().map(String::as_str) {
        Some("--help" | "-h" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some("--version" | "-V") => {
            println!("eventserver {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("serve") => serve(&args[1..]),
        Some("user") => user(&args[1..]),
        Some("stream") => stream(&args[1..]),
        Some("consumer") => consumer(&args[1..]),
        Some("backup") => backup(&args[1..]),
        Some(other) if !other.starts_with('-') => {
            Err(Usage(format!("unknown command '{other}'")).into())
        }
        _ => serve(args),
    }
}

/// Flags of the form `--name VALUE` or `--name=VALUE`, plus positional arguments.
struct Args {
    flags: Vec<(String, String)>,
    positional: Vec<String>,
}

fn parse_args(args: &[String], known: &[&str]) -> Result<Args, Usage> {
    let mut parsed = Args {
        flags: Vec::new(),
        positional: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            parsed.positional.push(arg.clone());
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                if !known.contains(&flag) {
                    return Err(Usage(format!("unknown flag '--{flag}'")));
                }
                let value = it
                    .next()
                    .ok_or_else(|| Usage(format!("flag '--{flag}' needs a value")))?;
                (flag.to_owned(), value.clone())
            }
        };
        if !known.contains(&name.as_str()) {
            return Err(Usage(format!("unknown flag '--{name}'")));
        }
        parsed.flags.push((name, value));
    }
    Ok(parsed)
}

impl Args {
    /// The flag's value, else the environment variable's, else `None`.
    fn setting(&self, name: &str) -> Option<(String, String)> {
        if let Some((_, v)) = self.flags.iter().rev().find(|(n, _)| n == name) {
            return Some((format!("--{name}"), v.clone()));
        }
        let var = format!("EVENTSERVER_{}", name.to_uppercase().replace('-', "_"));
        std::env::var(&var).ok().map(|v| (var, v))
    }

    /// The setting parsed, if it is given; an unparsable value names its source.
    fn optional<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, Usage> {
        let Some((source, value)) = self.setting(name) else {
            return Ok(None);
        };
        let parsed = value
            .parse()
            .map_err(|_| Usage(format!("invalid value {value:?} for {source}")))?;
        Ok(Some(parsed))
    }

    /// `message` (from `Config::validate`, which names settings as flags) with its first
    /// setting named as the variable, when that is where the value came from.
    fn in_source_terms(&self, message: String) -> String {
        let Some(rest) = message.strip_prefix("--") else {
            return message;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '-')
            .collect();
        match self.setting(&name) {
            Some((source, _)) if !source.starts_with("--") => {
                format!("{source}{}", &rest[name.len()..])
            }
            _ => message,
        }
    }

    /// Overwrites `into` with the setting, if it is given.
    fn parsed<T: std::str::FromStr>(&self, name: &str, into: &mut T) -> Result<(), Usage> {
        if let Some(value) = self.optional(name)? {
            *into = value;
        }
        Ok(())
    }

    fn db(&self) -> PathBuf {
        match self.setting("db") {
            Some((_, path)) => PathBuf::from(path),
            None => match std::env::var_os("STATE_DIRECTORY") {
                // systemd may list several directories separated by ':'; ours is the first.
                Some(dirs) => {
                    let dirs = dirs.to_string_lossy().into_owned();
                    let first = dirs.split(':').next().unwrap_or_default().to_owned();
                    PathBuf::from(first).join("eventserver.db")
                }
                None => PathBuf::from("eventserver.db"),
            },
        }
    }
}

const SERVE_FLAGS: &[&str] = &[
    "listen",
    "db",
    "workers",
    "queue",
    "max-body",
    "read-timeout",
    "max-limit",
    "sync",
    "longpoll-max-timeout",
    "longpoll-max-batch",
    "max-parked",
    "max-connections",
    "events-path",
    "publish-path",
    "write-queue",
    "auth-cache-secs",
    "retain-events",
    "retain-secs",
    "metrics-auth",
    "auth-failure-limit",
    "auth-throttle-loopback",
    "public-subscribe",
    "public-publish",
];

fn serve_config(args: &Args) -> Result<Config, Usage> {
    let mut config = Config::new(args.db());
    args.parsed("listen", &mut config.listen)?;
    args.parsed("workers", &mut config.workers)?;
    args.parsed("queue", &mut config.queue)?;
    args.parsed("max-body", &mut config.max_body)?;
    args.parsed("max-limit", &mut config.max_limit)?;
    args.parsed("longpoll-max-timeout", &mut config.longpoll_max_timeout)?;
    args.parsed("longpoll-max-batch", &mut config.longpoll_max_batch)?;
    args.parsed("max-parked", &mut config.max_parked)?;
    // The default connection cap follows the parked-poll cap it makes room for.
    config.max_connections = eventserver::config::connections_for(config.max_parked);
    args.parsed("max-connections", &mut config.max_connections)?;
    args.parsed("events-path", &mut config.events_path)?;
    args.parsed("publish-path", &mut config.publish_path)?;
    args.parsed("write-queue", &mut config.write_queue)?;
    args.parsed("metrics-auth", &mut config.metrics_auth)?;
    args.parsed("auth-failure-limit", &mut config.auth_failure_limit)?;
    args.parsed("auth-throttle-loopback", &mut config.auth_throttle_loopback)?;
    config.retain_events = args.optional("retain-events")?;
    config.retain_age = args
        .optional("retain-secs")?
        .map(std::time::Duration::from_secs);
    let secs = |d: std::time::Duration| d.as_secs();
    config.read_timeout = std::time::Duration::from_secs(
        args.optional("read-timeout")?
            .unwrap_or(secs(config.read_timeout)),
    );
    config.auth_cache_ttl = std::time::Duration::from_secs(
        args.optional("auth-cache-secs")?
            .unwrap_or(secs(config.auth_cache_ttl)),
    );
    for (name, into) in [
        ("public-subscribe", &mut config.public_subscribe),
        ("public-publish", &mut config.public_publish),
    ] {
        if let Some((_, value)) = args.setting(name) {
            *into = value
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect();
        }
    }
    if let Some((source, value)) = args.setting("sync") {
        config.sync = match value.as_str() {
            "full" => SyncMode::Full,
            "normal" => SyncMode::Normal,
            _ => {
                return Err(Usage(format!(
                    "invalid value {value:?} for {source}: use full or normal"
                )));
            }
        };
    }
    config
        .validate()
        .map_err(|e| Usage(args.in_source_terms(e)))?;
    Ok(config)
}

fn serve(args: &[String]) -> Result<(), Failure> {
    small_default_stacks();
    let args = parse_args(args, SERVE_FLAGS)?;
    if let Some(extra) = args.positional.first() {
        return Err(Usage(format!("unexpected argument '{extra}'")).into());
    }
    // Raise the descriptor limit before the parked-request cap is derived from it.
    eventserver::sys::raise_open_files_limit();
    let config = serve_config(&args)?;
    let db = config.db.clone();
    if !admin::has_users(&db)? {
        create_first_user(&db)?;
    }
    // Past RLIMIT_FSIZE a write should fail (and answer 500), not kill the process.
    let xfsz = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGXFSZ, xfsz)
        .map_err(|e| Failure::Runtime(format!("cannot install signal handlers: {e}")))?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| Failure::Runtime(format!("cannot install signal handlers: {e}")))?;
    let settings = format!(
        "db={} workers={} queue={} max_body={} sync={:?} longpoll_max_timeout={} max_parked={} \
         max_connections={}",
        db.display(),
        config.workers,
        config.queue,
        config.max_body,
        config.sync,
        config.longpoll_max_timeout,
        config.max_parked,
        config.max_connections
    );
    let (read_timeout, longpoll_max_timeout) = (config.read_timeout, config.longpoll_max_timeout);
    let server = match eventserver::sys::systemd_listener()
        .map_err(|e| Failure::Runtime(format!("cannot adopt the socket systemd passed: {e}")))?
    {
        Some(listener) => Server::start_on(listener, config)?,
        None => Server::start(config)?,
    };
    let server = std::sync::Arc::new(server);
    log::info(&format!(
        "eventserver {} listening on {} ({settings})",
        env!("CARGO_PKG_VERSION"),
        server.addr()
    ));
    if read_timeout.as_secs() <= longpoll_max_timeout {
        log::warn(&format!(
            "--read-timeout {}s does not outlast --longpoll-max-timeout {longpoll_max_timeout}s: \
             longer polls have their connection closed right after the answer",
            read_timeout.as_secs()
        ));
    }
    eventserver::sys::notify(&format!("READY=1\nSTATUS=serving on {}", server.addr()));
    if let Some(interval) = eventserver::sys::watchdog_interval() {
        spawn_watchdog(server.addr(), interval);
    }
    if let Some(signal) = signals.forever().next() {
        log::info(&format!("signal {signal} received; shutting down"));
    }
    eventserver::sys::notify("STOPPING=1\nSTATUS=shutting down");
    server.shutdown();
    log::info("shutdown complete");
    Ok(())
}

/// Restarts this process with `RUST_MIN_STACK=65536` (and `MALLOC_ARENA_MAX=2`) unless it
/// is set: tiny_http starts a thread per connection with the default stack, and 10,000
/// parked long-polls would otherwise reserve 20 GB of virtual memory. (Our own threads set
/// their stacks.)
fn small_default_stacks() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("RUST_MIN_STACK").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env("RUST_MIN_STACK", "65536");
    // glibc gives each busy thread its own 64 MiB arena (16 on 2 cores): with a thread per
    // connection that is a gigabyte of address space for nothing.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        command.env("MALLOC_ARENA_MAX", "2");
    }
    let error = command.exec();
    log::warn(&format!(
        "could not restart with small thread stacks: {error}"
    ));
}

/// Pings systemd's watchdog while the server answers its own health check: a dead accept
/// loop, stuck workers or an unwritable database all stop the pings and systemd restarts
/// the service.
fn spawn_watchdog(addr: std::net::SocketAddr, interval: std::time::Duration) {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let period = interval / 3;
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .stack_size(256 << 10)
        .spawn(move || {
            loop {
                if healthy(target, period) {
                    eventserver::sys::notify("WATCHDOG=1");
                } else {
                    log::warn("the health self-check failed; not pinging the watchdog");
                }
                std::thread::sleep(period);
            }
        });
    if let Err(e) = spawned {
        log::error(&format!("cannot start the watchdog thread: {e}"));
    }
}

/// GET /healthz on our own address, within `timeout`.
fn healthy(addr: std::net::SocketAddr, timeout: std::time::Duration) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut head = [0u8; 12];
    stream.write_all(request).is_ok()
        && stream.read_exact(&mut head).is_ok()
        && head.starts_with(b"HTTP/1.1 200")
}

/// On a fresh database: one user with a random password, printed once.
fn create_first_user(db: &std::path::Path) -> Result<(), Failure> {
    let password = uuid::Uuid::new_v4().simple().to_string();
    admin::add_user(db, "admin", &password)?;
    println!(
        "Created user 'admin' with password '{password}' (shown only now).\n\
         Add more users with: eventserver user add NAME --db {}",
        db.display()
    );
    Ok(())
}

fn user(args: &[String]) -> Result<(), Failure> {
    let parsed = parse_args(args, &["db", "produce", "consume"])?;
    let db = parsed.db();
    match parsed
        .positional
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()[..]
    {
        ["add", name] => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map_err(|e| {
                Failure::Runtime(format!("cannot read the password from stdin: {e}"))
            })?;
            let password = line.trim_end_matches(['\r', '\n']);
            let grant = |flag: &str| {
                parsed
                    .flags
                    .iter()
                    .rev()
                    .find(|(n, _)| n == flag)
                    .map_or("*", |(_, v)| v.as_str())
            };
            match admin::add_user_with(&db, name, password, grant("produce"), grant("consume"))? {
                admin::Added::Created => println!("added user '{name}'"),
                admin::Added::Replaced => println!("replaced the password of user '{name}'"),
            }
            Ok(())
        }
        ["list"] => {
            for (name, produce, consume) in admin::list_users(&db)? {
                if produce == "*" && consume == "*" {
                    println!("{name}");
                } else {
                    println!("{name}  produce={produce:?} consume={consume:?}");
                }
            }
            Ok(())
        }
        ["remove", name] => {
            if admin::remove_user(&db, name)? {
                println!("removed user '{name}'");
                Ok(())
            } else {
                Err(Failure::Runtime(format!("no user named '{name}'")))
            }
        }
        _ => Err(Usage(
            "usage: eventserver user add NAME | user list | user remove NAME [--db PATH]".into(),
        )
        .into()),
    }
}

fn stream(args: &[String]) -> Result<(), Failure> {
    let parsed = parse_args(args, &["db"])?;
    let db = parsed.db();
    match parsed.positional.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["list"] => {
            println!("{:<32} {:<20} {:>10} {:>10}  LAST EVENT (ms)", "STREAM", "OWNER", "EVENTS", "LAST SEQ");
            for s in admin::list_streams(&db)? {
                let owner = s.owner.as_deref().unwrap_or("-");
                println!("{:<32} {:<20} {:>10} {:>10}  {}", s.name, owner, s.events, s.last_seq, s.last_ms);
            }
            Ok(())
        }
        ["show", name] => {
            let Some(d) = admin::show_stream(&db, name)? else {
                return Err(Failure::Runtime(format!("no stream named '{name}'")));
            };
            println!("stream:      {}", d.summary.name);
            println!("owner:       {}", d.summary.owner.as_deref().unwrap_or("-"));
            println!("events:      {}", d.summary.events);
            println!("last seq:    {}", d.summary.last_seq);
            println!("first event: {} ms", d.first_ms);
            println!("last event:  {} ms", d.summary.last_ms);
            println!("consumers:");
            for c in d.consumers {
                println!("  {} {} offset={} lag={}", c.consumer, c.event_name, c.offset, c.lag);
            }
            Ok(())
        }
        ["release", name] => {
            if admin::release_stream(&db, name)? {
                println!("released stream '{name}': the next producer to write it claims it");
                Ok(())
            } else {
                Err(Failure::Runtime(format!("no stream named '{name}'")))
            }
        }
        _ => Err(Usage("usage: eventserver stream list | stream show STREAM | stream release STREAM [--db PATH]".into()).into()),
    }
}

fn consumer(args: &[String]) -> Result<(), Failure> {
    let parsed = parse_args(args, &["db"])?;
    let db = parsed.db();
    match parsed
        .positional
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()[..]
    {
        ["reset", stream, consumer, event_name, offset] => {
            let offset: u64 = offset
                .parse()
                .map_err(|_| Usage(format!("invalid offset {offset:?}: use a sequence number")))?;
            admin::reset_consumer(&db, stream, consumer, event_name, offset)?;
            println!("consumer '{consumer}' of '{stream}' ({event_name}) now at offset {offset}");
            Ok(())
        }
        _ => Err(Usage(
            "usage: eventserver consumer reset STREAM CONSUMER EVENT_NAME OFFSET [--db PATH]"
                .into(),
        )
        .into()),
    }
}

fn backup(args: &[String]) -> Result<(), Failure> {
    let parsed = parse_args(args, &["db"])?;
    let [target] = &parsed.positional[..] else {
        return Err(Usage("usage: eventserver backup PATH [--db PATH]".into()).into());
    };
    admin::backup(&parsed.db(), std::path::Path::new(target))?;
    println!("backed up {} to {target}", parsed.db().display());
    Ok(())
}
