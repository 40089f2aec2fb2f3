//! eventserver: a small, fast, durable HTTP event server.
//!
//! Two HTTP APIs over one append-only log per stream in SQLite: the streams API
//! (`/api/v1/streams/<stream>/events…`: one producer per stream, consumers with server-kept
//! offsets, cumulative ACKs) and golongpoll's long-poll API (`/events`, `/publish`). A
//! category and a stream are the same thing.
//!
//! # Architecture
//!
//! Layers; a module uses only modules below it, and each foreign crate has one owner.
//!
//! | layer | module | role | may not |
//! |---|---|---|---|
//! | 4 | `main.rs` | argv/env → [`Config`], signals, exit codes | reach past the public API |
//! | 3 | [`server`] | wiring and shutdown order; spawns threads (with `pool`, `http`) | hold request logic |
//! | 2 | [`http`] | the only module naming tiny_http; body limits; answering | know routes |
//! | 1 | [`api`] | routes, validation, each API's error contract | name tiny_http or rusqlite |
//! | 0 | [`store`] | the only module naming rusqlite: schema, writer, readers | know HTTP |
//! | 0 | [`longpoll`] | parked replies per category, deadlines; no I/O, no threads | block |
//! | 0 | [`auth`], [`clock`], [`config`], [`event`], [`metrics`], [`pool`], [`log`], [`sys`], [`error`], [`settings`], [`service`] | | |
//!
//! Request path: tiny_http's accept loop → [`http`] decodes the request (reading any large
//! body on its own short-lived thread) → a bounded queue, writes and reads apart and writes
//! first (full: 503) → a worker runs
//! [`api`] with its own read connection → writes go to the single writer thread, which
//! commits whatever is queued in one transaction and only then answers (group commit).
//! Long-polls park in [`longpoll::Registry`]; a commit wakes them with events from memory,
//! the timer thread answers them at their deadline.
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
//! - No unsafe code outside `store::walbuf` (a SQLite VFS that batches WAL writes) and one
//!   adoption of systemd's socket in [`sys`].
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
pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod error;
pub mod event;
pub mod http;
mod lock;
pub mod log;
pub mod longpoll;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod service;
pub mod settings;
pub mod store;
pub mod sys;

pub use config::{Config, SyncMode};
pub use error::Error;
pub use event::Start;
pub use server::{Polled, Received, Server, ServerHandle};
