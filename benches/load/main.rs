//! `cargo bench --bench load`: eventserver's load-testing suite, group commit's bench among
//! its scenarios.
//!
//! ```text
//! cargo bench --bench load -- [SCENARIO...] [OPTIONS]
//!   SCENARIO   publish consume fanout idle categories mixed retention, or all (the
//!              default); or nodes alone (see "Several nodes" below)
//!   --url http://127.0.0.1:PORT --user U --password P [--pid PID]
//!              load a server that is already running (loopback only); --pid lets the
//!              idle and mixed scenarios read its memory and threads from /proc
//!   --duration SECS      length of each timed phase (publish runs 5, idle 10,
//!                        categories 10, mixed 60 by default)
//!   --conns 1,16,64,256  publish: connection counts      --api streams,publish
//!   --streams N          publish: spread the connections over N streams (default: one
//!                        stream, and producer, per connection)
//!   --subscribers 1000,9000   fanout: subscriber counts
//!   --events 100 --interval-ms 50     fanout: events published and their spacing
//!   --consume-events 100000 --limit 1000      consume: stream length, page size
//!   --idle 9000          idle: parked subscribers
//!   --categories 1000 --category-subscribers 9000 --rate 200   categories scenario
//!   --threads N          event-loop threads for the subscriber scenarios (default 1)
//!   --workers N          worker threads of a server the bench starts
//!   --server-bin PATH    the eventserver binary to spawn (default: the one cargo built)
//!   --db postgres://USER:PASS@HOST:PORT/DB [--nodes N]
//!                        spawn N servers (default 1) on that PostgreSQL database instead
//!                        of one on a temporary SQLite file, and spread the connections
//!                        over them (needs a server built with the postgres feature)
//!   --nodelay-listener   diagnostic: in-process servers get a TCP_NODELAY listener
//!   --engine-floor       load a bare tiny_http long-poll server instead (fanout and
//!                        categories; see floor.rs): the engine's own limit here
//!   --versus-floor [--rounds N]   run eventserver and the bare engine interleaved N times
//!                        (default 3) and print both medians and their ratio (publish,
//!                        fanout, categories; see versus.rs)
//!   --close-with-reset   subscribers end with a reset (SO_LINGER 0) instead of a FIN, as
//!                        killed clients or NATs timing out do
//!   --report DIR         also write, per scenario run, DIR/NAME.svg (latency percentiles
//!                        and throughput over time, and the server's RSS and threads) and
//!                        the DIR/NAME.json it is drawn from (see chart.rs)
//! ```
//!
//! # Scenarios
//!
//! - **publish**: K keep-alive connections (1, 16, 64, 256) append as fast as they can for
//!   `--duration` (5 s) each, through the streams API (a stream and producer per connection)
//!   and through `/publish` (a category per connection). Only 200s count, and a 200 means
//!   committed with the server's durability, so events/s is durable appends/s; the 64 vs 1
//!   ratio shows group commit at work. Also shown: the server's mean commit batch
//!   and commit time (from its `/metrics`), and storage bytes written per event.
//! - **consume**: 100,000 events, then one and eight consumers paging GET + ACK through all
//!   of them; each must see every event once, all in the same order.
//! - **fanout**: N subscribers (1,000 and 9,000) on one category, M events one every
//!   interval; publish→delivery latency, publish→last subscriber, delivered/expected,
//!   duplicates, out-of-order ([`verdict`]).
//! - **idle**: `--idle` subscribers parked for `--duration` (10 s): server RSS, threads and
//!   descriptors before, parked, and 2 s and 8 s after the bench closed the connections (by
//!   then the server has let go of the polls, and tiny_http's pool has ended the threads
//!   left idle).
//! - **categories**: 9,000 subscribers over 1,000 categories, random publishes at `--rate`
//!   for `--duration` (10 s): each subscriber must get exactly its category's events.
//! - **mixed**: all at once for `--duration` (60 s); see `mixed.rs`.
//! - **retention**: `--retain-events 1000` turned on over 1,000,000 events while 64
//!   connections (`--conns K`) publish for `--duration` (10 s): p99, max, and the time
//!   until trimmed, beside the same load without retention; see `retention.rs`.
//!
//! # Comparing with the bare engine
//!
//! `cargo bench --bench load -- SCENARIO --versus-floor [--rounds N]` runs SCENARIO
//! (publish, fanout or categories; all three when none is named) against a fresh
//! eventserver and a fresh bare engine (`--engine-floor`), N rounds (3 by default), which
//! one goes first alternating from round to round. Both run as processes of their own. After
//! each run's usual table it prints, per headline figure, every round's value, both
//! medians and the ratio eventserver ÷ floor, and one JSON line (`{"scenario":
//! "versus-floor", …}`). The figures: publish, events/s on 64 connections through
//! `/publish` and the streams API, each against the floor's `/publish` (the only write path
//! it serves); fanout, delivery p50, p99 and delivered %
//! at each `--subscribers` count; categories, delivery p50, p99 and delivered %. For example
//! `-- fanout --versus-floor --subscribers 1000,9000 --rounds 3`.
//!
//! # Several nodes
//!
//! `cargo bench --features postgres --bench load -- SCENARIO --db postgres://… --nodes N`
//! spawns N `eventserver serve` processes on free ports, all on that database, after adding
//! the bench's user there with `eventserver user add`. Connection `i` of every scenario goes
//! to node `i % N` (subscriber `i` likewise), while setup work and the paced publisher of
//! the subscriber scenarios use the first node: in fanout, the subscribers on the other
//! nodes are woken across nodes, and the table shows their latency apart ("other p99").
//! The group-commit figures add up every node's `/metrics`; memory and threads are the first
//! node's. The database is used as it is: each run's streams and categories are named after
//! the run, so earlier runs' events are only in the way, not in the figures. The server must
//! be built with the `postgres` feature, as `cargo bench --features postgres` builds the one
//! it spawns; a binary without it is refused with a message saying so. (`retention` always
//! runs on SQLite, in process.)
//!
//! `cargo bench --features postgres --bench load -- nodes --db postgres://… [--nodes N]
//! [--rounds R]` runs publish (1 and 64 connections unless `--conns` says otherwise) and
//! fanout (1,000 subscribers unless `--subscribers` says otherwise) on one node on SQLite,
//! one node on PostgreSQL and N nodes (2 by default) on PostgreSQL, R rounds (1 by
//! default) with the order rotating from round to round, and prints one table of their
//! headline figures, medians over the rounds, and a JSON line (`{"scenario": "nodes", …}`);
//! see `nodes.rs`.
//!
//! # Which server is loaded
//!
//! Without `--url`, every scenario starts a fresh server on 127.0.0.1 with a temporary
//! database and a user made for the run, and stops it afterwards. Scenarios with few
//! connections (publish, consume, and fanout while 3 × subscribers + 1,024 fit under the
//! open-files limit, i.e. the 1,000-subscriber run) run it **in this process** through the
//! library (`eventserver::Server::start`, log level warn). Those with thousands of
//! connections (fanout 9,000, idle, categories, mixed) **spawn the real `eventserver`
//! binary** instead: tiny_http spends two descriptors per connection, so 9,000 subscribers
//! plus the server's side would not fit in one process's 20,000 open files, and a process of
//! its own lets `/proc/<pid>` give the server's memory and threads alone. The binary is the
//! one cargo builds alongside this bench (`CARGO_BIN_EXE_eventserver`, bench profile), so
//! nothing needs building by hand; `--server-bin` picks another. It is started as
//! `eventserver serve --listen 127.0.0.1:<free port> --db <temp>` with
//! `EVENTSERVER_LOG=warn` (a log line per request would flood the terminal and is not what
//! is measured), the bench waits until the port answers, and ends it with SIGTERM (SIGKILL
//! after 30 s). With `--url`, every scenario loads that server instead (any server speaking
//! golongpoll's API works for fanout, idle and categories); pass `--pid` for the memory
//! figures.
//!
//! # How it loads
//!
//! One mio (epoll) loop per thread drives many raw HTTP/1.1 keep-alive connections, one
//! request at a time on each ([`engine`]); paced publishers use a blocking connection on a
//! thread of their own. Subscribers resume with `since_time`/`last_id` and retry a refused
//! poll after 50-150 ms. Every loop is bounded in time (a hard deadline per run) and count
//! (reconnections), and only loopback addresses are ever contacted. The soft open-files limit
//! is raised to the hard one at start.
//!
//! # Reading the figures
//!
//! The load generator shares the machine's two cores with the server: each table shows the
//! CPU its loops used, and the load average is printed before and after every scenario
//! (other work on the machine skews everything). Each scenario prints a table and one JSON
//! line (`{"scenario": …}`) for tooling.

mod chart;
mod consume;
mod engine;
mod fanout;
mod floor;
mod mixed;
mod nodes;
mod publish;
mod report;
mod retention;
mod subscribe;
mod target;
mod verdict;
mod versus;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;

use report::Figure;
use target::{Source, Target};

/// The two write paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `POST /api/v1/streams/<s>/events`.
    Streams,
    /// `POST /publish`.
    Publish,
}

impl Api {
    /// Its name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Api::Streams => "streams",
            Api::Publish => "publish",
        }
    }
}

/// Everything the command line sets.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Scenarios to run, in order.
    pub scenarios: Vec<String>,
    /// Which server to load.
    pub source: Source,
    /// Overrides every timed phase's length.
    pub duration: Option<f64>,
    /// publish: connection counts.
    pub conns: Vec<usize>,
    /// publish: write paths.
    pub apis: Vec<Api>,
    /// publish: streams (categories) the connections share; `None`: one per connection.
    pub streams: Option<usize>,
    /// fanout: subscriber counts.
    pub subscribers: Vec<usize>,
    /// fanout: events published.
    pub events: usize,
    /// fanout: milliseconds between events.
    pub interval_ms: u64,
    /// consume: events in the stream.
    pub consume_events: u64,
    /// consume: page size.
    pub limit: usize,
    /// idle: parked subscribers.
    pub idle: usize,
    /// categories: how many.
    pub categories: usize,
    /// categories: subscribers over all of them.
    pub category_subscribers: usize,
    /// categories: publishes per second.
    pub rate: f64,
    /// Event-loop threads for subscribers.
    pub threads: usize,
    /// Distinguishes this run's streams and categories from earlier runs' on the same server.
    pub run_id: String,
    /// `--versus-floor`: rounds of eventserver against the bare engine, or `None`.
    pub versus_floor: Option<usize>,
    /// Subscribers end with a reset instead of a FIN.
    pub close_with_reset: bool,
    /// `--report`: where to write each run's chart and its data.
    pub report: Option<PathBuf>,
    /// `nodes`: rounds of the single-node and several-node comparison, or `None`.
    pub nodes_rounds: Option<usize>,
}

const SCENARIOS: &[&str] = &[
    "publish",
    "consume",
    "fanout",
    "idle",
    "categories",
    "mixed",
    "retention",
];

/// The comparison of one node on SQLite with one and several on PostgreSQL (`nodes.rs`).
const NODES: &str = "nodes";

/// The scenarios whose figures `--versus-floor` can set against the bare engine's.
const VERSUS_FLOOR: &[&str] = &["publish", "fanout", "categories"];

fn list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| format!("bad value {x:?} for {flag}"))
        })
        .collect()
}

fn parse_args(args: Vec<String>) -> Result<Opts, String> {
    let mut opts = Opts {
        scenarios: Vec::new(),
        source: Source::Own {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_eventserver")),
            workers: None,
            nodelay: false,
            floor: false,
            own_process: false,
            postgres: None,
            nodes: 1,
        },
        duration: None,
        conns: vec![1, 16, 64, 256],
        apis: vec![Api::Streams, Api::Publish],
        streams: None,
        subscribers: vec![1_000, 9_000],
        events: 100,
        interval_ms: 50,
        consume_events: 100_000,
        limit: 1000,
        idle: 9_000,
        categories: 1_000,
        category_subscribers: 9_000,
        rate: 200.0,
        threads: 1,
        run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        versus_floor: None,
        close_with_reset: false,
        report: None,
        nodes_rounds: None,
    };
    let (mut url, mut user, mut password, mut pid, mut workers, mut bin) =
        (None, None, None, None, None, None);
    let (mut db, mut nodes, mut conns, mut subscribers) = (None, None, None, None);
    let (mut nodelay, mut floor, mut versus, mut rounds) = (false, false, false, None);
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if !flag.starts_with("--") {
            if flag == "all" {
                opts.scenarios
                    .extend(SCENARIOS.iter().map(|s| s.to_string()));
            } else if SCENARIOS.contains(&flag.as_str()) || flag == NODES {
                opts.scenarios.push(flag);
            } else {
                return Err(format!(
                    "unknown scenario {flag:?} (known: {} {NODES})",
                    SCENARIOS.join(" ")
                ));
            }
            continue;
        }
        // cargo passes --bench to harness-less benches.
        if flag == "--bench" {
            continue;
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let num = |v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("bad value {v:?} for {flag}"))
        };
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--user" => user = Some(value()?),
            "--password" => password = Some(value()?),
            "--pid" => {
                pid = Some(
                    value()?
                        .parse::<u32>()
                        .map_err(|_| "bad --pid".to_owned())?,
                )
            }
            "--workers" => workers = Some(num(value()?)? as usize),
            "--server-bin" => bin = Some(PathBuf::from(value()?)),
            "--db" => db = Some(value()?),
            "--nodes" => nodes = Some((num(value()?)? as usize).clamp(1, 64)),
            "--nodelay-listener" => nodelay = true,
            "--engine-floor" => floor = true,
            "--versus-floor" => versus = true,
            "--close-with-reset" => opts.close_with_reset = true,
            "--report" => opts.report = Some(PathBuf::from(value()?)),
            "--rounds" => rounds = Some((num(value()?)? as usize).clamp(1, 100)),
            "--duration" => opts.duration = Some(num(value()?)?.clamp(0.1, 3600.0)),
            "--conns" => conns = Some(list(&flag, &value()?)?),
            "--api" => {
                opts.apis = value()?
                    .split(',')
                    .map(|a| match a {
                        "streams" => Ok(Api::Streams),
                        "publish" => Ok(Api::Publish),
                        _ => Err(format!("bad --api {a:?}: streams or publish")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--streams" => opts.streams = Some((num(value()?)? as usize).max(1)),
            "--subscribers" => subscribers = Some(list(&flag, &value()?)?),
            "--events" => opts.events = num(value()?)? as usize,
            "--interval-ms" => opts.interval_ms = num(value()?)? as u64,
            "--consume-events" => opts.consume_events = num(value()?)? as u64,
            "--limit" => opts.limit = num(value()?)? as usize,
            "--idle" => opts.idle = num(value()?)? as usize,
            "--categories" => opts.categories = num(value()?)?.max(1.0) as usize,
            "--category-subscribers" => opts.category_subscribers = num(value()?)? as usize,
            "--rate" => opts.rate = num(value()?)?.max(0.1),
            "--threads" => opts.threads = (num(value()?)? as usize).clamp(1, 16),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let comparing_nodes = opts.scenarios.iter().any(|s| s == NODES);
    if comparing_nodes {
        if opts.scenarios.len() > 1 || versus || url.is_some() || floor {
            return Err(format!(
                "{NODES} runs alone and starts its servers itself: no other scenario, \
                 --versus-floor, --url or --engine-floor"
            ));
        }
        if db.is_none() {
            return Err(format!(
                "{NODES} needs --db postgres://USER:PASS@HOST:PORT/DB"
            ));
        }
        opts.nodes_rounds = Some(rounds.take().unwrap_or(1));
        opts.conns = conns.take().unwrap_or_else(|| vec![1, 64]);
        opts.subscribers = subscribers.take().unwrap_or_else(|| vec![1_000]);
    }
    if let Some(c) = conns {
        opts.conns = c;
    }
    if let Some(s) = subscribers {
        opts.subscribers = s;
    }
    if let Some(db) = &db {
        if eventserver::Engine::of(db.as_ref()) != eventserver::Engine::Postgres {
            return Err(
                "--db takes a postgres:// URL (SQLite runs get a temporary file of their own)"
                    .into(),
            );
        }
        if url.is_some() || floor || versus {
            return Err(
                "--db goes with servers the bench starts: no --url, --engine-floor \
                 or --versus-floor"
                    .into(),
            );
        }
    } else if nodes.is_some_and(|n| n > 1) {
        return Err("several nodes share a PostgreSQL database: give --db postgres://…".into());
    }
    if versus {
        if url.is_some() || floor {
            return Err(
                "--versus-floor starts both servers itself: no --url or --engine-floor".into(),
            );
        }
        if opts.scenarios.is_empty() {
            opts.scenarios = VERSUS_FLOOR.iter().map(|s| s.to_string()).collect();
        }
        if let Some(s) = opts
            .scenarios
            .iter()
            .find(|s| !VERSUS_FLOOR.contains(&s.as_str()))
        {
            return Err(format!(
                "--versus-floor compares {} only, not {s}",
                VERSUS_FLOOR.join(", ")
            ));
        }
        opts.versus_floor = Some(rounds.unwrap_or(3));
    } else if rounds.is_some() {
        return Err(format!("--rounds goes with --versus-floor or {NODES}"));
    }
    if opts.scenarios.is_empty() {
        opts.scenarios = SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    if opts.limit == 0 || opts.events == 0 {
        return Err("--limit and --events must be at least 1".into());
    }
    if let Some(url) = url {
        let (Some(user), Some(password)) = (user, password) else {
            return Err("--url needs --user and --password".into());
        };
        opts.source = Source::External {
            addr: target::parse_url(&url)?,
            user,
            password,
            pid,
        };
    } else if user.is_some() || password.is_some() || pid.is_some() {
        return Err("--user, --password and --pid go with --url".into());
    } else if let Source::Own {
        bin: b,
        workers: w,
        nodelay: d,
        floor: f,
        own_process: _,
        postgres: p,
        nodes: n,
    } = &mut opts.source
    {
        *w = workers;
        *d = nodelay;
        *f = floor;
        *p = db;
        // `nodes` compares one node with several: two unless told.
        *n = nodes.unwrap_or(if comparing_nodes { 2 } else { 1 });
        if let Some(bin) = bin {
            *b = bin;
        }
    }
    Ok(opts)
}

/// A small deterministic generator (xorshift64*) for random category picks.
pub struct Rng(u64);

impl Rng {
    /// Seeded; the same seed gives the same picks.
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// One authenticated request to each node, so its credential cache is warm before timing.
pub fn prime(target: &Target) -> Result<(), String> {
    for site in target.node_sites() {
        let mut client = wire::Blocking::new(&site);
        let (status, body) = client
            .call(|site, out| {
                let body = br#"{"category":"load-prime","data":{}}"#;
                site.post(out, "/publish", "", "application/json", body)
            })
            .map_err(|e| format!("cannot reach the server at {}: {e}", site.addr))?;
        if status != 200 {
            return Err(format!(
                "the server at {} answered {status} to an authenticated request: {}",
                site.addr,
                String::from_utf8_lossy(&body)
            ));
        }
    }
    Ok(())
}

/// The machine's 1-minute load average: other work on the two cores skews every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Raises the soft open-files limit to the hard one: thousands of sockets are the point.
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Runs `scenario` once, printing its table and JSON line; its headline figures (none for
/// consume, idle and mixed).
pub fn run_scenario(opts: &Opts, scenario: &str, nofile: u64) -> Result<Vec<Figure>, String> {
    match scenario {
        "publish" => publish::run(opts),
        "consume" => consume::run(opts).map(|()| Vec::new()),
        "fanout" => fanout::fanout(opts, nofile),
        "idle" => fanout::idle(opts).map(|()| Vec::new()),
        "categories" => fanout::categories(opts),
        "mixed" => mixed::run(opts).map(|()| Vec::new()),
        "retention" => retention::run(opts).map(|()| Vec::new()),
        _ => unreachable!("checked when parsing"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, addr] = &args[..]
        && flag == "--floor-server"
    {
        return match floor::serve(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("load: the floor server cannot serve on {addr}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &opts.report
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        eprintln!("load: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let nofile = raise_nofile();
    eventserver::log::set_level(eventserver::log::Level::Warn);
    eprintln!(
        "load: run {} — scenarios {} — open files {nofile} — {} cores — load average {}",
        opts.run_id,
        opts.scenarios.join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    let mut failed = false;
    for scenario in &opts.scenarios {
        let result = match (opts.versus_floor, opts.nodes_rounds) {
            (_, Some(rounds)) => nodes::compare(&opts, rounds, nofile),
            (Some(rounds), None) => versus::compare(&opts, scenario, rounds, nofile),
            (None, None) => run_scenario(&opts, scenario, nofile).map(drop),
        };
        eprintln!("load: {scenario} done — load average {}", load_average());
        if let Err(e) = result {
            eprintln!("load: {scenario} failed: {e}");
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
