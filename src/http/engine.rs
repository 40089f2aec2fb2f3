//! Engines and their replacement: a tiny_http server on a clone of our listener, the
//! dispatch threads that take requests from it, and a successor started when its accept
//! loop dies.
//!
//! tiny_http 0.12's accept thread ends for good on any `accept()` error, and panics
//! silently when it cannot clone an accepted socket or spawn a connection thread (see the
//! module docs of `http` for the tests that show it). A dispatch thread learns of the first
//! from `recv`; the prober learns of the second from `/proc/self/fd` ([`Engine::dead`]).
//! Either asks for a successor ([`replace_engine`]); a replaced engine keeps serving its open
//! connections until it falls silent, then its dispatch threads end.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DISPATCHERS, Shared, keep_thread, lock, spawn_small};

/// Threads a new engine starts: tiny_http's accept thread and the first four of its
/// connection pool, and our dispatchers.
const ENGINE_THREADS: usize = 1 + 4 + DISPATCHERS;

/// A new accept loop wanted, and when to (next) try starting it.
pub(super) struct Successor {
    at: Instant,
    /// Whether to log its start (not after the expected idle timeout).
    announce: bool,
    /// The wait after the next failed attempt.
    pause: Duration,
}

/// One tiny_http server: an accept thread, its connection pool and its request queue.
pub(super) struct Engine {
    pub(super) server: tiny_http::Server,
    /// The listener clone the accept thread owns. It is closed when that thread ends, also
    /// when it panics, which it does silently (e.g. EMFILE on the `try_clone` of a socket
    /// it just accepted, or a failed thread spawn): the one sign such a death leaves.
    listener_fd: RawFd,
    /// Whether a newer engine has taken over accepting.
    pub(super) replaced: AtomicBool,
    /// Threads taking requests from it.
    dispatchers: AtomicUsize,
    /// Held by a dispatch thread from taking a request until it is numbered on its
    /// connection: tiny_http writes a connection's answers strictly in the order it read
    /// the requests, and our numbering must be that order.
    taking: Mutex<()>,
    born: Instant,
}

impl Engine {
    /// Whether the accept thread is known to have ended: its listener is closed.
    pub(super) fn dead(&self, shared: &Shared) -> bool {
        shared
            .listener_link
            .as_ref()
            .is_some_and(|link| crate::sys::fd_link(self.listener_fd).as_ref() != Some(link))
    }
}

/// Starts a tiny_http server on a clone of our listener and registers it; its dispatch
/// threads are started separately.
pub(super) fn new_engine(shared: &Shared) -> io::Result<Arc<Engine>> {
    let listener = shared.listener.try_clone()?;
    let listener_fd = listener.as_raw_fd();
    // tiny_http panics, rather than failing, when it cannot spawn its accept thread.
    let server = std::panic::catch_unwind(|| tiny_http::Server::from_listener(listener, None))
        .map_err(|_| io::Error::other("cannot spawn the accept thread"))?
        .map_err(|e| io::Error::other(e.to_string()))?;
    let engine = Arc::new(Engine {
        server,
        listener_fd,
        replaced: AtomicBool::new(false),
        dispatchers: AtomicUsize::new(0),
        taking: Mutex::new(()),
        born: Instant::now(),
    });
    lock(&shared.engines).push(engine.clone());
    Ok(engine)
}

/// Starts the threads that take requests from `engine`: [`DISPATCHERS`] of them, or as many
/// as can be spawned, at least one. When none can, the engine is shut down again.
pub(super) fn spawn_dispatchers(shared: &Arc<Shared>, engine: Arc<Engine>) -> io::Result<()> {
    for _ in 0..DISPATCHERS {
        let (inner, mine) = (shared.clone(), engine.clone());
        match spawn_small("http-dispatch", move || take_requests(&inner, &mine)) {
            Ok(handle) => {
                keep_thread(shared, handle);
                engine.dispatchers.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) if engine.dispatchers.load(Ordering::SeqCst) == 0 => {
                // Dropping the last handle on the tiny_http server ends its accept thread.
                lock(&shared.engines).retain(|e| !Arc::ptr_eq(e, &engine));
                return Err(e);
            }
            Err(_) => break,
        }
    }
    Ok(())
}

/// Whether `n` more threads can be started now: spawns them and lets them end at once.
/// tiny_http's pool leaks the threads it started when it fails to start all of its first
/// ones, so a new engine is only started when there is room for all of its threads.
fn room_for_threads(n: usize) -> io::Result<()> {
    let (release, released) = crossbeam_channel::bounded::<()>(0);
    let mut spawned = Vec::with_capacity(n);
    let mut result = Ok(());
    for _ in 0..n {
        let released = released.clone();
        match spawn_small("http-room", move || {
            let _ = released.recv();
        }) {
            Ok(handle) => spawned.push(handle),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    drop(release);
    for handle in spawned {
        // These threads only wait on a channel: they cannot panic.
        let _ = handle.join();
    }
    result
}

/// A dispatch thread: takes requests from one engine until shutdown, numbers each on its
/// connection and dispatches it, and asks for a successor if the engine's accept loop dies.
/// Several threads share an engine (its queue takes many consumers) so decoding and
/// dispatching spread over the cores.
fn take_requests(shared: &Arc<Shared>, engine: &Arc<Engine>) {
    let mut last_request = Instant::now();
    loop {
        let taken = {
            let _turn = lock(&engine.taking);
            // A bounded wait, so a thread of a replaced engine notices when it falls silent.
            engine
                .server
                .recv_timeout(Duration::from_secs(1))
                .map(|rq| rq.map(|rq| (super::order::number(shared, &rq), rq)))
        };
        match taken {
            Ok(Some((order, rq))) => {
                last_request = Instant::now();
                super::exchange::dispatch(shared, rq, order);
            }
            Ok(None) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                if engine.replaced.load(Ordering::SeqCst) {
                    // One thread is enough for what a replaced engine still delivers (its
                    // open connections), and threads may be what is short.
                    let spare = engine
                        .dispatchers
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n > 1).then(|| n - 1)
                        })
                        .is_ok();
                    if spare || last_request.elapsed() >= shared.retire_after() {
                        break;
                    }
                }
            }
            Err(_) if shared.stopping.load(Ordering::SeqCst) => break,
            Err(e) => {
                let idle = matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                );
                if idle {
                    // The listener's receive timeout ended an idle accept: expected.
                    replace_engine(shared, engine, None);
                } else {
                    replace_engine(shared, engine, Some(&e.to_string()));
                }
            }
        }
    }
    lock(&shared.engines).retain(|e| !Arc::ptr_eq(e, engine));
}

/// Marks `engine`, whose accept loop has ended (`why`, unless it was the expected idle
/// timeout), as replaced and asks for its successor, unless that was done already.
pub(super) fn replace_engine(shared: &Arc<Shared>, engine: &Engine, why: Option<&str>) {
    if engine.replaced.swap(true, Ordering::SeqCst) {
        return;
    }
    // A loop that dies at once again (EMFILE persists) is retried with a pause, so a
    // descriptor shortage does not become a busy loop.
    let delay = if engine.born.elapsed() < Duration::from_secs(1) {
        Duration::from_millis(200)
    } else {
        Duration::ZERO
    };
    match why {
        Some(why) => crate::log::error(&format!(
            "the HTTP accept loop stopped ({why}); starting a new one"
        )),
        None => crate::log::debug("the idle HTTP accept loop timed out; starting a new one"),
    }
    want_successor(shared, delay, why.is_some());
}

/// Asks for a new accept loop after `delay`; starts it at once (from this thread) when that
/// is zero. Failed attempts (no descriptors, no threads) are retried by the prober, which
/// needs nothing new to run.
pub(super) fn want_successor(shared: &Arc<Shared>, delay: Duration, announce: bool) {
    {
        let mut pending = lock(&shared.successor);
        let successor = pending.get_or_insert(Successor {
            at: Instant::now() + delay,
            announce,
            pause: Duration::from_millis(200),
        });
        successor.announce |= announce;
    }
    if delay.is_zero() {
        start_successor(shared);
    }
}

/// Starts the accept loop [`want_successor`] asked for, if it is due.
pub(super) fn start_successor(shared: &Arc<Shared>) {
    let mut pending = lock(&shared.successor);
    let Some(successor) = pending.as_mut() else {
        return;
    };
    if successor.at > Instant::now() || shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    let started = room_for_threads(ENGINE_THREADS * 2)
        .and_then(|()| new_engine(shared))
        .and_then(|e| spawn_dispatchers(shared, e));
    match started {
        Ok(()) => {
            if successor.announce {
                crate::log::info("a new HTTP accept loop is running");
            }
            *pending = None;
        }
        Err(e) => {
            crate::log::error(&format!("cannot restart the accept loop yet: {e}"));
            successor.at = Instant::now() + successor.pause;
            successor.pause = (successor.pause * 2).min(Duration::from_secs(1));
        }
    }
}
