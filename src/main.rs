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
  eventserver user add NAME [--db PATH]   add a user; the password is the first line of stdin
  eventserver user list [--db PATH]
  eventserver user remove NAME [--db PATH]
  eventserver --version | --help

Serve options (each also an environment variable, EVENTSERVER_<NAME>; flags win):
  --listen ADDR                 address to bind            [127.0.0.1:8080]
  --db PATH                     SQLite database file       [./eventserver.db, or
                                                            $STATE_DIRECTORY/eventserver.db]
  --workers N                   worker threads             [2 x cores]
  --queue N                     requests waiting for a worker before 503 [64 x workers]
  --max-body BYTES              largest request body       [1048576]
  --max-limit N                 largest streams-API limit  [1000]
  --sync full|normal            commit durability          [full]
  --longpoll-max-timeout SECS   longest long-poll timeout  [110]
  --longpoll-max-batch N        most events per long-poll answer [250]
  --max-parked N                most parked long-polls     [from the open-files limit]
  --events-path PATH            long-poll subscribe path   [/events]
  --publish-path PATH           long-poll publish path     [/publish]
  --write-queue N               writes queued for the writer before 503 [16384]
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

    fn parsed<T: std::str::FromStr>(&self, name: &str, into: &mut T) -> Result<(), Usage> {
        if let Some((source, value)) = self.setting(name) {
            *into = value
                .parse()
                .map_err(|_| Usage(format!("invalid value {value:?} for {source}")))?;
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
    "max-limit",
    "sync",
    "longpoll-max-timeout",
    "longpoll-max-batch",
    "max-parked",
    "events-path",
    "publish-path",
    "write-queue",
];

fn serve_config(args: &Args) -> Result<Config, Usage> {
    let mut config = Config::new(args.db());
    args.parsed("listen", &mut config.listen)?;
    args.parsed("workers", &mut config.workers)?;
    config.queue = 64 * config.workers;
    args.parsed("queue", &mut config.queue)?;
    args.parsed("max-body", &mut config.max_body)?;
    args.parsed("max-limit", &mut config.max_limit)?;
    args.parsed("longpoll-max-timeout", &mut config.longpoll_max_timeout)?;
    args.parsed("longpoll-max-batch", &mut config.longpoll_max_batch)?;
    args.parsed("max-parked", &mut config.max_parked)?;
    args.parsed("events-path", &mut config.events_path)?;
    args.parsed("publish-path", &mut config.publish_path)?;
    args.parsed("write-queue", &mut config.write_queue)?;
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
    config.validate().map_err(Usage)?;
    Ok(config)
}

fn serve(args: &[String]) -> Result<(), Failure> {
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
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| Failure::Runtime(format!("cannot install signal handlers: {e}")))?;
    let settings = format!(
        "db={} workers={} queue={} max_body={} sync={:?} longpoll_max_timeout={} max_parked={}",
        db.display(),
        config.workers,
        config.queue,
        config.max_body,
        config.sync,
        config.longpoll_max_timeout,
        config.max_parked
    );
    let server = Server::start(config)?;
    log::info(&format!(
        "eventserver {} listening on {} ({settings})",
        env!("CARGO_PKG_VERSION"),
        server.addr()
    ));
    let mut signals = signals;
    if let Some(signal) = signals.forever().next() {
        log::info(&format!("signal {signal} received; shutting down"));
    }
    server.shutdown();
    log::info("shutdown complete");
    Ok(())
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
    let parsed = parse_args(args, &["db"])?;
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
            match admin::add_user(&db, name, password)? {
                admin::Added::Created => println!("added user '{name}'"),
                admin::Added::Replaced => println!("replaced the password of user '{name}'"),
            }
            Ok(())
        }
        ["list"] => {
            for name in admin::list_users(&db)? {
                println!("{name}");
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
