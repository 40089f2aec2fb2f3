//! Catching up with other nodes: a node sharing its database reads what the others commit,
//! once per woken category, and fans it out from memory like its own commits.
//!
//! A node's writer registers its own commits in memory as they land (`Runtime::committed`).
//! Another node's commits reach it two ways, both queued here as [`CatchUp`]: the
//! database's notification that a category has new events, and the registry refusing a
//! local commit that does not follow on from memory (the other node's events lie between).
//! This thread takes whatever is queued, keeps the newest sequence number per category,
//! and for each category memory is behind on, with parked polls or a tail of recent events,
//! reads the events after memory's high-water mark in one query (more only when there are
//! more than a read's limit) and publishes them: the waiters are answered from memory,
//! never one query per poll, and resuming clients find the tail up to date. A category
//! memory holds nothing of costs no query (`Registry::announce`).
//!
//! A failed read leaves the polls parked; the next notification, or the re-check of every
//! waited-on category ([`CatchUp::Recheck`]) that follows a reconnection of the
//! notifications ([`listen`]), reads them again, and their deadlines answer them meanwhile.

use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::App;
use crate::event::{Event, Start};
use crate::store::Reader;

/// Something the catch-up thread is to do.
pub(crate) enum CatchUp {
    /// The category's events up to this sequence number are committed.
    Behind(Arc<str>, u64),
    /// Notifications may have been missed: read every category polls wait on.
    Recheck,
    /// Stop, after what is queued before.
    Stop,
}

/// Events read per query; a category further behind takes several.
const READ_LIMIT: usize = 1024;

/// Runs the catch-up thread until it takes [`CatchUp::Stop`] or its queue closes.
pub(crate) fn run(app: &App, reader: &mut Reader, queue: &Receiver<CatchUp>) {
    while let Ok(first) = queue.recv() {
        let mut behind: HashMap<Arc<str>, u64> = HashMap::new();
        let mut recheck = false;
        let mut stop = false;
        for next in std::iter::once(first).chain(queue.try_iter()) {
            match next {
                CatchUp::Behind(category, seq) => {
                    let newest = behind.entry(category).or_insert(seq);
                    *newest = (*newest).max(seq);
                }
                CatchUp::Recheck => recheck = true,
                CatchUp::Stop => stop = true,
            }
        }
        for (category, seq) in behind {
            if let Some(after) = app.runtime.registry.announce(&category, seq) {
                read_after(app, reader, &category, after);
            }
        }
        if recheck {
            for (category, hwm) in app.runtime.registry.waited_on() {
                read_after(app, reader, &category, hwm);
            }
        }
        if stop {
            return;
        }
    }
}

/// How long the listening thread waits for a notification before it looks whether the
/// server is stopping: what a shutdown may wait for it.
#[cfg(feature = "postgres")]
const LISTEN_STEP: std::time::Duration = std::time::Duration::from_millis(100);

/// Longest wait between two attempts to reconnect the notifications.
#[cfg(feature = "postgres")]
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the listening thread of a node on the PostgreSQL database `url` until the server
/// stops: it hears every node's appends and queues them for the catch-up thread. After it
/// (re)connects it queues a [`CatchUp::Recheck`]: appends announced while it was not
/// listening were not heard. A database that is down is tried again with growing waits up
/// to [`RECONNECT_MAX`], and logged once per outage.
#[cfg(feature = "postgres")]
pub(crate) fn listen(app: &App, url: &str) {
    let mut wait = LISTEN_STEP;
    let mut down = false;
    while !app.runtime.stopping() {
        let mut listener = match crate::store::pg::Listener::connect(url) {
            Ok(listener) => listener,
            Err(e) => {
                if !down {
                    crate::log::error(&format!("cannot listen for other nodes' appends: {e}"));
                    down = true;
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        if down {
            crate::log::warn("listening for other nodes' appends again");
        }
        (wait, down) = (LISTEN_STEP, false);
        app.runtime.catch_up(CatchUp::Recheck);
        while !app.runtime.stopping() {
            match listener.wait(LISTEN_STEP) {
                Ok(heard) => {
                    for (stream, seq) in heard {
                        app.runtime.catch_up(CatchUp::Behind(stream.into(), seq));
                    }
                }
                Err(e) => {
                    crate::log::error(&format!("lost the other nodes' appends: {e}"));
                    down = true;
                    break;
                }
            }
        }
    }
}

/// Reads `category`'s events after `after` and publishes them, waking who waits.
fn read_after(app: &App, reader: &mut Reader, category: &str, mut after: u64) {
    loop {
        let view = match reader.since(category, &Start::After(after), None, READ_LIMIT) {
            Ok(view) => view,
            Err(e) => {
                crate::log::error(&format!("catching up with {category} failed: {e}"));
                return;
            }
        };
        let events: Vec<Arc<Event>> = view.events.into_iter().map(Arc::new).collect();
        let Some(last) = events.last() else { return };
        after = last.seq;
        app.runtime.caught_up(category, &events);
        if events.len() < READ_LIMIT {
            return;
        }
    }
}
