//! eventserver: a small, fast, durable HTTP event server.
//!
//! Two HTTP APIs over one append-only log per stream in SQLite: the streams API
//! (`/api/v1/streams/<stream>/events…`: one producer per stream, consumers with server-kept
//! offsets, cumulative ACKs) and golongpoll's long-poll API (`/events`, `/publish`). A
//! category and a stream are the same thing.
//!
//! # Public API
//!
//! What embedders, the `eventserver` binary and the benches use; everything else is private,
//! so the compiler holds the map below.
//!
//! - [`Server`] starts a server from a [`Config`]; the [`ServerHandle`] it returns offers
//!   in-process [`publish`](ServerHandle::publish) and
//!   [`subscribe`](ServerHandle::subscribe) ([`Start`], [`Polled`], [`Received`]) and a
//!   graceful shutdown. Failures are an [`Error`]; one refused in process carries the
//!   API's [`Failure`].
//! - [`settings`]: the table of `serve`'s settings (flags, environment, defaults, rules).
//! - [`service`]: running as a daemon (thread stacks, open-files limit, signals, systemd).
//! - [`admin`]: the operator commands on a database file (users, streams, backup).
//! - `pg` (cargo feature `postgres`): the PostgreSQL store several nodes share, chosen by a
//!   `postgres://` URL in [`Config::db`]. It is `store::pg`, the only module naming the
//!   postgres crate, public so that its contracts are tested from outside.
//! - [`log`]: the one-line-per-event logger. [`check`]: every parser of client input, for
//!   property tests and fuzzing.
//!
//! # Architecture
//!
//! Layers; a module uses only modules below it, and each foreign crate has one owner.
//!
//! | layer | module | role | may not |
//! |---|---|---|---|
//! | 4 | `main.rs` | argv/env → [`Config`] through [`settings`], exit codes | reach past the public API (enforced: it is another crate) |
//! | 3 | `server` | wiring and shutdown order; spawns threads (with `pool`, `http`) | hold request logic |
//! | 3 | [`service`] | running as a daemon: thread stacks, signals, systemd (its watchdog asks the server's own `/healthz` through `http`) | reach into the server's internals |
//! | 2 | `http/` | the only module naming tiny_http: decoding and answering (`exchange`), per-connection answer order (`order`), accept loops and their replacement (`engine`), the prober (`prober`) | know routes |
//! | 1 | `api/` | routes and handlers (`mod`, `streams`, `longpoll`, its Server-Sent Events `sse`, the status page `status`), reading what other nodes commit (`catch_up`), which lane a request waits in (`admission`), what browsers and proxies add (`edge`), the failure catalogue rendered per API (`error`), the runtime that answers later (`runtime`) | name tiny_http or rusqlite |
//! | 0 | `store/` | the only module naming rusqlite (and, in `pg`, postgres): schema, writer (group commit, the same loop over either engine's `writer::Log`), checkpoints (`checkpoint`, on a thread of their own), readers (`Reader`, either engine), retention in chunks | know HTTP |
//! | 0 | `longpoll` | parked replies per category, deadlines; no I/O, no threads | block |
//! | 0 | `auth`, `clock`, `config`, `event`, `metrics`, `pool`, `lock`, `sys`, [`log`], [`settings`], [`admin`] | | |
//! | – | `error` | the public [`Error`], joining each layer's own (it names `api::Failure` and `admin::Refusal`) | be used by a lower layer |
//!
//! The path of a request, by the names that carry it: tiny_http's accept loop → `http`
//! decodes it (reading any large body on its own short-lived thread) and hands it with its
//! `api::Reply` to the server's `http::Front` → `api::admission` picks its lane, writes
//! before reads, or refuses it (503) → a worker (`pool`) runs the handler in `api` with its
//! own read connection → a write becomes a `store::writer::Job` for the single writer
//! thread, which commits whatever is queued in one transaction and hands each outcome back
//! as an `Answer` → `api::runtime` wakes the long-polls the commit concerns and queues the
//! answers as `pool::Task`s → a worker sends each through its `Reply`. A long-poll parks in
//! `longpoll::Registry` until a commit wakes it from memory or the timer thread answers it
//! at its deadline.
//!
//! # Invariants
//!
//! - A 200 to a producer means the event is committed to disk (`synchronous=FULL` unless
//!   configured otherwise).
//! - No lock is held across I/O: the registry hands replies out and they are answered after
//!   the lock is released, on worker threads.
//! - Checking for events and parking are one critical section against the category's
//!   high-water mark, so no wake-up is lost.
//! - Every parked request is answered exactly once: by events, by its deadline, or at
//!   shutdown. A dropped reply answers 500 rather than vanishing.
//! - Cursors are sequence numbers; `since_time`/`last_id` are resolved to one.
//! - Everything is bounded by [`Config`]: queues, bodies, parked requests, batch sizes.
//! - No unsafe code outside `sys`: one adoption of systemd's socket and one duplicate of a
//!   connection's descriptor for a stream of events. `store` forbids it.
//!
//! # Embedding
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let db = dir.path().join("events.db");
//! eventserver::admin::add_user(&db, "app", "s3cret").unwrap();
//! let mut config = eventserver::Config::new(&db);
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! let server = eventserver::Server::start(config).unwrap();
//! println!("listening on {}", server.addr());
//!
//! // In process, the way Go programs use golongpoll's manager: a subscriber waits while
//! // a publisher publishes.
//! std::thread::scope(|s| {
//!     let waiting = s.spawn(|| {
//!         let start = eventserver::Start::Since { ms: 0, last_id: None };
//!         server.subscribe("news", start, std::time::Duration::from_secs(5))
//!     });
//!     let id = server.publish("news", &serde_json::json!({"headline": "hello"})).unwrap();
//!     match waiting.join().unwrap().unwrap() {
//!         eventserver::Polled::Events(events) => {
//!             assert_eq!(events[0].id, id);
//!             assert_eq!(events[0].data["headline"], "hello");
//!         }
//!         other => panic!("expected the event, got {other:?}"),
//!     }
//! });
//! server.shutdown();
//! ```

#![deny(unsafe_code)]

pub mod admin;
mod api;
mod auth;
mod clock;
mod config;
mod error;
mod event;
mod http;
mod lock;
pub mod log;
mod longpoll;
mod metrics;
mod pool;
mod server;
pub mod service;
pub mod settings;
mod store;
mod sys;

pub use api::Failure;
pub use api::check;
pub use api::longpoll::{Polled, Received};
pub use config::{Cidr, Config, Engine, SyncMode};
pub use error::Error;
pub use event::Start;
pub use server::{Server, ServerHandle};
#[cfg(feature = "postgres")]
pub use store::pg;
