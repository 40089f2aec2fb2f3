//! The `eventserver` command: argv and environment to [`eventserver::Config`], signals,
//! exit codes. Everything it does goes through the library's public API: the serve
//! settings (flags, variables, usage lines) come from [`eventserver::settings`], running as
//! a service from [`eventserver::service`].

use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;

use eventserver::service::{self, StopSignals};
use eventserver::{Server, admin, log, settings};

const COMMANDS: &str = "\
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
  eventserver consumer remove STREAM CONSUMER [--db PATH]
                                      forget a consumer that went away for good: retention
                                      (--retain-acked-only) stops keeping events for it
  eventserver backup PATH [--force] [--db PATH]  consistent copy, safe while serving; PATH
                                      never holds a partial copy, and an existing
                                      file there is kept unless --force replaces it
  eventserver --version | --help

Serve options (each also an environment variable, EVENTSERVER_<NAME>; flags win):
";

const AFTER_OPTIONS: &str = "
Admin commands work on the database (a SQLite file, or a postgres:// URL in a build with
the postgres feature; backup is SQLite's only) and are safe while the server runs.
Under systemd (Type=notify) it reports READY/STOPPING/WATCHDOG and adopts a socket passed
by socket activation (LISTEN_FDS) instead of binding --listen.
";

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

/// Why a command failed: a mistake in how it was called (exit status 2), or something
/// that went wrong while it ran (exit status 1).
enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<eventserver::Error> for Failure {
    fn from(e: eventserver::Error) -> Failure {
        match e {
            eventserver::Error::Config(invalid) => Failure::Usage(invalid.to_string()),
            eventserver::Error::Admin(refusal) => Failure::Usage(refusal.to_string()),
            other => Failure::Runtime(other.to_string()),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::Usage(message.into())
}

fn run(args: &[String]) -> Result<(), Failure> {
    log::init_from_env().map_err(Failure::Usage)?;
    let admin_command = match args.first().map(String::as_str) {
        Some("--help" | "-h" | "help") => {
            print!("{COMMANDS}{}{AFTER_OPTIONS}", settings::usage());
            return Ok(());
        }
        Some("--version" | "-V") => {
            println!("eventserver {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Some("serve") => return serve(&args[1..]),
        Some(name) if !name.starts_with('-') => ADMIN
            .iter()
            .find(|(command, ..)| *command == name)
            .ok_or_else(|| usage(format!("unknown command '{name}'")))?,
        _ => return serve(args),
    };
    let (_, known, command) = admin_command;
    let args = Args::parse(&args[1..], known)?;
    let words: Vec<&str> = args.positional.iter().map(String::as_str).collect();
    command(&settings::db(&args.flags)?, &words, &args)
}

/// An admin command: the database, its positional words, and all its arguments.
type AdminCommand = fn(&Path, &[&str], &Args) -> Result<(), Failure>;

/// The admin commands: name, the flags each takes, what runs it.
const ADMIN: &[(&str, &[&str], AdminCommand)] = &[
    ("user", &["db", "produce", "consume"], user),
    ("stream", &["db"], stream),
    ("consumer", &["db"], consumer),
    ("backup", &["db", "force"], backup),
];

/// Flags that take no value: given or not.
const SWITCHES: &[&str] = &["force"];

/// Flags of the form `--name VALUE` or `--name=VALUE` (or `--name` for a switch), plus
/// positional arguments.
#[derive(Default)]
struct Args {
    flags: Vec<(String, String)>,
    positional: Vec<String>,
}

impl Args {
    /// Splits `args`, refusing flags not in `known`.
    fn parse(args: &[String], known: &[&str]) -> Result<Args, Failure> {
        let mut parsed = Args::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                parsed.positional.push(arg.clone());
                continue;
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (flag, None),
            };
            if !known.contains(&name) {
                return Err(usage(format!("unknown flag '--{name}'")));
            }
            let value = match value {
                Some(_) if SWITCHES.contains(&name) => {
                    return Err(usage(format!("flag '--{name}' takes no value")));
                }
                Some(value) => value,
                None if SWITCHES.contains(&name) => String::new(),
                None => it
                    .next()
                    .ok_or_else(|| usage(format!("flag '--{flag}' needs a value")))?
                    .clone(),
            };
            parsed.flags.push((name.to_owned(), value));
        }
        Ok(parsed)
    }

    /// The last value given for `flag`.
    fn flag(&self, flag: &str) -> Option<&str> {
        let last = self.flags.iter().rev().find(|(n, _)| n == flag);
        last.map(|(_, v)| v.as_str())
    }
}

fn serve(args: &[String]) -> Result<(), Failure> {
    // Before anything else: the restart repeats whatever ran before it.
    service::use_small_thread_stacks();
    let names: Vec<&str> = settings::SETTINGS.iter().map(|s| s.name).collect();
    let args = Args::parse(args, &names)?;
    if let Some(extra) = args.positional.first() {
        return Err(usage(format!("unexpected argument '{extra}'")));
    }
    service::raise_open_files_limit();
    let config = settings::config(&args.flags)?;
    create_first_user(&config)?;
    let signals = StopSignals::install()
        .map_err(|e| Failure::Runtime(format!("cannot install signal handlers: {e}")))?;
    let settings = format!(
        "db={} workers={} queue={} max_body={} sync={:?} longpoll_max_timeout={} max_parked={} \
         max_connections={}",
        config.db_shown(),
        config.workers,
        config.queue,
        config.max_body,
        config.sync,
        config.longpoll_max_timeout,
        config.max_parked,
        config.max_connections
    );
    let (read_timeout, longpoll_max_timeout) = (config.read_timeout, config.longpoll_max_timeout);
    let server = match service::systemd_listener()
        .map_err(|e| Failure::Runtime(format!("cannot adopt the socket systemd passed: {e}")))?
    {
        Some(listener) => Server::start_on(listener, config)?,
        None => Server::start(config)?,
    };
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
    let watchdog = service::ready(server.addr());
    if let Some(signal) = signals.wait() {
        log::info(&format!("signal {signal} received; shutting down"));
    }
    drop(watchdog);
    service::stopping();
    server.shutdown();
    log::info("shutdown complete");
    Ok(())
}

/// On a fresh database: one user with a random password, printed once.
fn create_first_user(config: &eventserver::Config) -> Result<(), Failure> {
    let password = uuid::Uuid::new_v4().simple().to_string();
    if admin::add_first_user(&config.db, "admin", &password)? {
        println!(
            "Created user 'admin' with password '{password}' (shown only now).\n\
             Add more users with: eventserver user add NAME --db {}",
            config.db_shown()
        );
    }
    Ok(())
}

/// There is no `what` called `name`.
fn no_such(what: &str, name: &str) -> Failure {
    Failure::Runtime(format!("no {what} named '{name}'"))
}

/// Prints `done` if the command found the `what` called `name`.
fn found(found: bool, what: &str, name: &str, done: String) -> Result<(), Failure> {
    if !found {
        return Err(no_such(what, name));
    }
    println!("{done}");
    Ok(())
}

fn user(db: &Path, words: &[&str], args: &Args) -> Result<(), Failure> {
    match *words {
        ["add", name] => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map_err(|e| {
                Failure::Runtime(format!("cannot read the password from stdin: {e}"))
            })?;
            let password = line.trim_end_matches(['\r', '\n']);
            let grant = |flag| args.flag(flag).unwrap_or("*");
            match admin::add_user_with(db, name, password, grant("produce"), grant("consume"))? {
                admin::Added::Created => println!("added user '{name}'"),
                admin::Added::Replaced => println!("replaced the password of user '{name}'"),
            }
            Ok(())
        }
        ["list"] => {
            for (name, produce, consume) in admin::list_users(db)? {
                if produce == "*" && consume == "*" {
                    println!("{name}");
                } else {
                    println!("{name}  produce={produce:?} consume={consume:?}");
                }
            }
            Ok(())
        }
        ["remove", name] => found(
            admin::remove_user(db, name)?,
            "user",
            name,
            format!("removed user '{name}'"),
        ),
        _ => Err(usage(
            "usage: eventserver user add NAME | user list | user remove NAME [--db PATH]",
        )),
    }
}

fn stream(db: &Path, words: &[&str], _: &Args) -> Result<(), Failure> {
    match *words {
        ["list"] => {
            println!(
                "{:<32} {:<20} {:>10} {:>10}  LAST EVENT (ms)",
                "STREAM", "OWNER", "EVENTS", "LAST SEQ"
            );
            for s in admin::list_streams(db)? {
                let owner = s.owner.as_deref().unwrap_or("-");
                println!(
                    "{:<32} {:<20} {:>10} {:>10}  {}",
                    s.name, owner, s.events, s.last_seq, s.last_ms
                );
            }
            Ok(())
        }
        ["show", name] => {
            let d = admin::show_stream(db, name)?.ok_or_else(|| no_such("stream", name))?;
            println!("stream:      {}", d.summary.name);
            println!("owner:       {}", d.summary.owner.as_deref().unwrap_or("-"));
            println!("events:      {}", d.summary.events);
            println!("last seq:    {}", d.summary.last_seq);
            println!("first event: {} ms", d.first_ms);
            println!("last event:  {} ms", d.summary.last_ms);
            println!("consumers:");
            for c in d.consumers {
                println!(
                    "  {} {} offset={} lag={}",
                    c.consumer, c.event_name, c.offset, c.lag
                );
            }
            if !d.held.is_empty() {
                println!("held back by retention (unacknowledged, past the limits):");
                for (consumer, events) in d.held {
                    println!("  {consumer} {events} events");
                }
            }
            Ok(())
        }
        ["release", name] => found(
            admin::release_stream(db, name)?,
            "stream",
            name,
            format!("released stream '{name}': the next producer to write it claims it"),
        ),
        _ => Err(usage(
            "usage: eventserver stream list | stream show STREAM | stream release STREAM [--db PATH]",
        )),
    }
}

fn consumer(db: &Path, words: &[&str], _: &Args) -> Result<(), Failure> {
    match *words {
        ["reset", stream, consumer, event_name, offset] => {
            let offset: u64 = offset
                .parse()
                .map_err(|_| usage(format!("invalid offset {offset:?}: use a sequence number")))?;
            admin::reset_consumer(db, stream, consumer, event_name, offset)?;
            println!("consumer '{consumer}' of '{stream}' ({event_name}) now at offset {offset}");
            Ok(())
        }
        ["remove", stream, consumer] => found(
            admin::remove_consumer(db, stream, consumer)?,
            "consumer",
            consumer,
            format!(
                "removed consumer '{consumer}' of '{stream}': retention no longer waits for it"
            ),
        ),
        _ => Err(usage(
            "usage: eventserver consumer reset STREAM CONSUMER EVENT_NAME OFFSET | \
             consumer remove STREAM CONSUMER [--db PATH]",
        )),
    }
}

fn backup(db: &Path, words: &[&str], args: &Args) -> Result<(), Failure> {
    let [target] = *words else {
        return Err(usage(
            "usage: eventserver backup PATH [--force] [--db PATH]",
        ));
    };
    let existing = match args.flag("force") {
        Some(_) => admin::IfExists::Replace,
        None => admin::IfExists::Refuse,
    };
    admin::backup(db, Path::new(target), existing).map_err(|e| match e {
        eventserver::Error::Admin(refused @ admin::Refusal::TargetExists(_)) => {
            usage(format!("{refused}: --force replaces it"))
        }
        other => other.into(),
    })?;
    println!("backed up {} to {target}", db.display());
    Ok(())
}
