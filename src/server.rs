//! Wiring and lifecycle: the only place (with `pool` and `http`) that spawns the server's
//! threads; `service` adds the systemd watchdog's for the binary.
//!
//! Threads: the HTTP accept loop(s), `workers` workers, one writer, one timer, and, on
//! SQLite, one checkpoint thread (poked by the writer after its commits), or, on a
//! PostgreSQL database that nodes share, one catch-up and one listening thread.
//! Shutdown order, each step waiting for the one before:
//! 1. stop accepting and close the request queue (new requests get 503);
//! 2. close the registry: every parked long-poll is answered now, later ones at once;
//! 3. wait until each worker has taken its last request;
//! 4. stop the writer after it commits everything queued; on SQLite it then drops the
//!    checkpoint thread's pokes, which stops that thread, waits for it to end, and
//!    checkpoints the database one last time;
//! 5. stop the catch-up thread after what is queued for it, and the listening thread;
//! 6. stop the workers once the last answers are sent, then the timer.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};

use crate::api::longpoll::Polled;
use crate::api::{self, App, Incoming, Runtime};
use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::Error;
use crate::event::Start;
use crate::http::HttpServer;
use crate::longpoll::Registry;
use crate::pool::{Pool, Task};
use crate::store::writer::{self, Job};
use crate::store::{self, Checkpointer, Reader, Retention};

/// Stack for the writer and timer threads: explicit, because the binary runs with a small
/// default (RUST_MIN_STACK) sized for tiny_http's per-connection threads; SQLite needs more.
const THREAD_STACK: usize = 1 << 20;

/// Recent events kept in memory per category, so resuming clients need no query.
const TAIL_LEN: usize = 64;

/// Starts servers; see [`ServerHandle`] for what a running one offers.
pub struct Server;

impl Server {
    /// Binds `config.listen` and starts serving.
    pub fn start(config: Config) -> Result<ServerHandle, Error> {
        config.validate().map_err(Error::Config)?;
        let listener = crate::http::bind(config.listen)?;
        Server::start_on(listener, config)
    }

    /// Starts serving on an existing listener (socket activation, tests, embedding).
    pub fn start_on(listener: TcpListener, config: Config) -> Result<ServerHandle, Error> {
        config.validate().map_err(Error::Config)?;
        crate::http::prepare(&listener)?;
        let mut log = Log::open(&config, &listener)?;
        let clock = Arc::new(Clock::starting_at(log.newest_timestamp()?));
        // Every worker opens its reader before serving; fail now rather than in a thread.
        Reader::open(&config.db)?;

        let (writer_tx, writer_rx) = bounded::<Job>(config.write_queue);
        let (tasks_tx, tasks_rx) = unbounded::<Task>();
        let (timer_tx, timer_rx) = bounded::<()>(1);
        // One queue per lane; which lane a request takes is the API's choice (`admit`).
        let (writes_tx, writes_rx) = bounded::<Incoming>(config.queue);
        let (reads_tx, reads_rx) = bounded::<Incoming>(config.queue);
        let (done_tx, done_rx) = unbounded::<()>();

        let registry = Registry::new(config.max_parked, TAIL_LEN.min(config.longpoll_max_batch));
        let app = Arc::new(App {
            runtime: Runtime::new(
                writer_tx,
                tasks_tx.clone(),
                timer_tx,
                registry,
                clock.clone(),
            ),
            auth: Authenticator::new(
                config.auth_cache_ttl,
                config.auth_failure_limit,
                config.auth_throttle_loopback,
            ),
            metrics: Default::default(),
            health_checks: Default::default(),
            config,
        });

        #[cfg(feature = "postgres")]
        let log_shared = log.shared();
        let (writer, checkpoints) = log.spawn(&app, writer_rx, clock)?;
        #[cfg(feature = "postgres")]
        let catch_up = match log_shared {
            true => Some(spawn_catch_up(&app)?),
            false => None,
        };
        #[cfg(not(feature = "postgres"))]
        let catch_up = None;

        let db = app.config.db.clone();
        let worker_app = app.clone();
        let pool = Pool::start(
            app.config.workers,
            [writes_rx, reads_rx],
            tasks_rx,
            done_tx,
            move |_| Reader::open(&db),
            move |reader: &mut Result<Reader, store::StoreError>, incoming: Incoming| match reader {
                Ok(reader) => worker_app.handle(reader, incoming.request, incoming.reply),
                Err(e) => {
                    crate::log::error(&format!("worker has no database connection: {e}"));
                    worker_app.refuse(incoming, &api::Failure::NoDatabase);
                }
            },
        )?;

        let timer = {
            let app = app.clone();
            thread::Builder::new()
                .name("timer".into())
                .stack_size(THREAD_STACK)
                .spawn(move || run_timer(&app, &timer_rx))?
        };

        let lanes = Arc::new(Lanes {
            app: app.clone(),
            open: RwLock::new(Some([writes_tx, reads_tx])),
        });
        let limits = crate::http::Limits {
            max_body: app.config.max_body,
            read_timeout: app.config.read_timeout,
            max_connections: app.config.max_connections,
            uncapped: api::HEALTH_PATHS,
        };
        let http = HttpServer::start(listener, limits, lanes.clone())?;
        Ok(ServerHandle {
            addr: http.addr(),
            app,
            running: Mutex::new(Some(Running {
                http,
                lanes,
                pool,
                done: done_rx,
                writer,
                checkpoints,
                catch_up,
                timer,
                tasks: tasks_tx,
            })),
            stopped: (Mutex::new(false), Condvar::new()),
        })
    }
}

/// The writer's log on the engine `--db` names.
// One per server, moved once into the writer thread: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Log {
    /// SQLite's write connection.
    Sqlite(store::writer::Sqlite),
    /// A node's connection to the PostgreSQL database it shares with other nodes.
    #[cfg(feature = "postgres")]
    Pg(store::pg::Writes),
}

impl Log {
    /// Opens the log `config.db` names; a node on PostgreSQL names its heartbeat after its
    /// host and the port of `listener`.
    fn open(config: &Config, listener: &TcpListener) -> Result<Log, Error> {
        #[cfg(feature = "postgres")]
        if config.engine() == crate::config::Engine::Postgres {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            let node = format!("{}:{port}", host.trim());
            let url = config.db.to_string_lossy();
            return Ok(Log::Pg(store::pg::Writes::new(&url, node)));
        }
        let _ = listener;
        let conn = store::open_write(&config.db, config.sync)?;
        Ok(Log::Sqlite(store::writer::Sqlite::new(conn)))
    }

    /// Whether other nodes write to the same database.
    #[cfg(feature = "postgres")]
    fn shared(&self) -> bool {
        !matches!(self, Log::Sqlite(_))
    }

    /// The newest event's time, for the clock to start at.
    fn newest_timestamp(&mut self) -> Result<u64, Error> {
        match self {
            Log::Sqlite(log) => Ok(store::newest_timestamp(log.connection())?),
            #[cfg(feature = "postgres")]
            Log::Pg(log) => Ok(log.newest_timestamp()?),
        }
    }

    /// Starts the writer thread (and, on SQLite, the checkpoint thread it pokes).
    fn spawn(
        self,
        app: &Arc<App>,
        jobs: Receiver<Job>,
        clock: Arc<Clock>,
    ) -> Result<(JoinHandle<()>, Option<JoinHandle<()>>), Error> {
        let writer = thread::Builder::new()
            .name("writer".into())
            // Set, like every thread of ours: the binary runs with RUST_MIN_STACK=64 KiB
            // for tiny_http's threads, too little for SQLite's commits and checkpoints.
            .stack_size(THREAD_STACK);
        match self {
            Log::Sqlite(log) => spawn_sqlite(log, writer, app, jobs, clock),
            #[cfg(feature = "postgres")]
            Log::Pg(log) => {
                let app = app.clone();
                let hook = move |committed: writer::Committed| on_commit(&app, committed);
                let writer = writer.spawn(move || {
                    writer::run(log, jobs, clock, hook);
                })?;
                Ok((writer, None))
            }
        }
    }
}

/// Starts the threads of a node that shares its database: one reads what the others
/// commit (`api::catch_up`), one listens for their announcements.
#[cfg(feature = "postgres")]
fn spawn_catch_up(app: &Arc<App>) -> Result<[JoinHandle<()>; 2], Error> {
    let (queue_tx, queue) = unbounded();
    app.runtime.share(queue_tx);
    let mut reader = Reader::open(&app.config.db)?;
    let reads = {
        let app = app.clone();
        thread::Builder::new()
            .name("catch-up".into())
            .stack_size(THREAD_STACK)
            .spawn(move || api::catch_up::run(&app, &mut reader, &queue))?
    };
    let app = app.clone();
    let listens = thread::Builder::new()
        .name("listen".into())
        .stack_size(THREAD_STACK)
        .spawn(move || api::catch_up::listen(&app, &app.config.db.to_string_lossy()))?;
    Ok([reads, listens])
}

/// Starts SQLite's writer thread as `writer` says, and the checkpoint thread it pokes.
fn spawn_sqlite(
    log: store::writer::Sqlite,
    writer: thread::Builder,
    app: &Arc<App>,
    jobs: Receiver<Job>,
    clock: Arc<Clock>,
) -> Result<(JoinHandle<()>, Option<JoinHandle<()>>), Error> {
    let checkpointer = Checkpointer::open(&app.config.db)?;
    let (pokes_tx, pokes_rx) = bounded::<()>(1);
    // Never sent on: disconnects when the checkpoint thread ends, however it ends.
    let (ended_tx, ended_rx) = bounded::<()>(0);
    let writer = {
        let app = app.clone();
        writer.spawn(move || {
            let hook = |committed: writer::Committed| {
                on_commit(&app, committed);
                // Full means a poke is pending already, which is as good.
                let _ = pokes_tx.try_send(());
            };
            let log = writer::run(log, jobs, clock, hook);
            // The checkpoint thread stops once its pokes are gone; the last
            // checkpoint waits for it, so that it runs alone.
            drop(pokes_tx);
            let _ = ended_rx.recv();
            if let Err(e) = store::checkpoint(log.connection()) {
                crate::log::warn(&format!("final checkpoint failed: {e}"));
            }
        })?
    };
    let checkpoints = {
        let app = app.clone();
        thread::Builder::new()
            .name("checkpoint".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let _ended = ended_tx;
                checkpointer.run(&pokes_rx, |wal| app.metrics.wal(wal.bytes, wal.pending))
            })?
    };
    Ok((writer, Some(checkpoints)))
}

/// The front door the HTTP layer hands requests to: admission by the API, then the lane's
/// queue for the workers (full, or closed at shutdown: 503).
struct Lanes {
    app: Arc<App>,
    /// The request queues (writes, then reads); `None` once the server stops accepting.
    open: RwLock<Option<[Sender<Incoming>; 2]>>,
}

impl crate::http::Front for Lanes {
    fn take(&self, request: api::Request, reply: api::Reply) {
        let Some((lane, incoming)) = self.app.admit(request, reply) else {
            return;
        };
        let open = crate::lock::read(&self.open);
        let refused = match open.as_ref() {
            Some(lanes) => lanes[lane as usize]
                .try_send(incoming)
                .err()
                .map(|e| e.into_inner()),
            None => Some(incoming),
        };
        drop(open);
        if let Some(incoming) = refused {
            self.app.refuse(incoming, &api::Failure::ServerBusy);
        }
    }

    fn holding(&self) -> bool {
        self.app.runtime.registry.parked() > 0
    }

    fn release_gone(&self, connected: &dyn Fn() -> Option<crate::sys::Peers>) {
        self.app.runtime.release_gone(connected);
    }
}

/// After each commit: count it, then let the runtime answer the writers and the long-polls
/// the new events wake.
fn on_commit(app: &App, committed: writer::Committed) {
    let appended = committed
        .appended
        .iter()
        .map(|a| (a.stream.as_str(), a.events.len()));
    app.metrics.commit(committed.jobs, committed.took, appended);
    app.runtime.committed(committed);
}

/// How often retention runs, when configured.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Answers parked requests at their deadlines, earliest first, sleeping in between; also
/// queues retention for the writer once a minute when it is configured.
fn run_timer(app: &App, pokes: &Receiver<()>) {
    let retention = app.config.retain_events.is_some() || app.config.retain_age.is_some();
    // The first round runs at start-up, then once a minute.
    let mut next_retention = Instant::now();
    while !app.runtime.stopping() {
        let wake = match (app.runtime.registry.next_deadline(), retention) {
            (Some(deadline), true) => Some(deadline.min(next_retention)),
            (Some(deadline), false) => Some(deadline),
            (None, true) => Some(next_retention),
            (None, false) => None,
        };
        let woke = match wake {
            Some(at) => pokes.recv_deadline(at),
            None => pokes.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match woke {
            Ok(()) => continue,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        app.runtime.expire(|registry| registry.expire(now));
        if retention && now >= next_retention {
            next_retention = now + RETENTION_EVERY;
            app.runtime.retain(Retention {
                max_events: app.config.retain_events,
                max_age_ms: app.config.retain_age.map(|a| a.as_millis() as u64),
                acked_only: app.config.retain_acked_only,
            });
        }
    }
}

/// A running server. `shutdown` and `join` take `&self`, so one thread can wait while
/// another (a signal handler, say) stops it.
pub struct ServerHandle {
    addr: SocketAddr,
    app: Arc<App>,
    running: Mutex<Option<Running>>,
    stopped: (Mutex<bool>, Condvar),
}

/// The parts that shutdown takes apart, in order.
struct Running {
    http: HttpServer,
    /// The request queues, closed when the server stops accepting.
    lanes: Arc<Lanes>,
    pool: Pool,
    done: Receiver<()>,
    writer: JoinHandle<()>,
    /// SQLite's checkpoint thread.
    checkpoints: Option<JoinHandle<()>>,
    /// The catch-up and listening threads of a node sharing its database.
    catch_up: Option<[JoinHandle<()>; 2]>,
    timer: JoinHandle<()>,
    tasks: Sender<Task>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Long-polls parked right now.
    pub fn parked(&self) -> usize {
        self.app.runtime.registry.parked()
    }

    /// Publishes `data` to `category` as `POST /publish` does (without a producer id) and
    /// returns the new event's id once it is durable.
    pub fn publish(&self, category: &str, data: &serde_json::Value) -> Result<Uuid, Error> {
        api::longpoll::publish_local(&self.app, category, data).map_err(Error::Refused)
    }

    /// Waits up to `timeout` for events of `category` after `start`, as `GET /events`
    /// does: the way a Rust program uses eventserver like golongpoll's manager.
    pub fn subscribe(
        &self,
        category: &str,
        start: Start,
        timeout: Duration,
    ) -> Result<Polled, Error> {
        let mut reader = Reader::open(&self.app.config.db)?;
        api::longpoll::subscribe_local(&self.app, &mut reader, category, start, timeout)
            .map_err(Error::Refused)
    }

    /// Stops the server gracefully: in-flight requests finish, parked long-polls are
    /// answered, everything queued for the writer is committed and the database is
    /// checkpointed. Returns when all of that is done; later calls return at once.
    ///
    /// # Panics
    ///
    /// Once everything is stopped, with the panic of a server thread that panicked outside
    /// a handler (a handler's panic is answered 500 and its worker goes on): that is a bug
    /// to surface, not to swallow. Not while the calling thread is already unwinding.
    pub fn shutdown(&self) {
        let running = crate::lock::lock(&self.running).take();
        if let Some(running) = running {
            let panicked = self.stop(running);
            *crate::lock::lock(&self.stopped.0) = true;
            self.stopped.1.notify_all();
            // A thread's panic is a bug to surface, not to swallow; but a second panic
            // while this thread unwinds (a handle dropped during a panic) would abort.
            if let Some(panic) = panicked {
                match thread::panicking() {
                    false => std::panic::resume_unwind(panic),
                    true => crate::log::error("a server thread panicked during shutdown"),
                }
            }
        }
    }

    /// Waits until [`ServerHandle::shutdown`] has finished (called from another thread).
    pub fn join(&self) {
        let mut stopped = crate::lock::lock(&self.stopped.0);
        while !*stopped {
            stopped = crate::lock::wait(&self.stopped.1, stopped);
        }
    }

    /// Takes the server apart in the order the module docs give; returns the first panic
    /// of a thread it joined, after joining them all.
    fn stop(&self, running: Running) -> Option<Box<dyn std::any::Any + Send>> {
        running.http.stop();
        *crate::lock::write(&running.lanes.open) = None;
        self.app.runtime.stop();
        self.app.runtime.expire(Registry::close);
        for _ in 0..self.app.config.workers {
            let _ = running.done.recv();
        }
        // No request can queue a write any more; Stop goes after everything queued.
        self.app.runtime.stop_writer();
        let writer = running.writer.join().err();
        // The writer's end stopped the checkpoint thread (it waited for it).
        let checkpoints = running.checkpoints.and_then(|t| t.join().err());
        // After the writer: its last commits may queue reads for the catch-up thread.
        #[cfg(feature = "postgres")]
        self.app.runtime.catch_up(api::catch_up::CatchUp::Stop);
        let catch_up = running
            .catch_up
            .into_iter()
            .flatten()
            .filter_map(|t| t.join().err())
            .next();
        for _ in 0..self.app.config.workers {
            let _ = running.tasks.send(Task::Stop);
        }
        let workers = running.pool.join();
        self.app.runtime.poke_timer();
        let timer = running.timer.join().err();
        writer.or(checkpoints).or(catch_up).or(workers).or(timer)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
