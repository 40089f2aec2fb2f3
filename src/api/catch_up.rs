//! Catching up with other nodes: a node sharing its database reads what the others commit,
//! once per woken category, and fans it out from memory like its own commits.
//!
//! A node's writer registers its own commits in memory as they land (`Runtime::committed`).
//! Another node's commits reach it two ways, both queued here as [`CatchUp`]: the
//! database's notification that a category has new events, and the registry refusing a
//! local commit that does not follow on from memory (the other node's events lie between).
//! This thread takes whatever is queued, keeps the newest sequence number per category,
//! and for each category with parked polls behind it reads the events after memory's
//! high-water mark in one query (more only when there are more than a read's limit) and
//! publishes them: the waiters are answered from memory, never one query per poll. A
//! category nobody waits on costs no query (`Registry::announce`).
//!
//! A failed read leaves the polls parked; the next notification reads them again, and
//! their deadlines answer them meanwhile.

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
    /// Stop, after what is queued before.
    Stop,
}

/// Events read per query; a category further behind takes several.
const READ_LIMIT: usize = 1024;

/// Runs the catch-up thread until it takes [`CatchUp::Stop`] or its queue closes.
pub(crate) fn run(app: &App, reader: &mut Reader, queue: &Receiver<CatchUp>) {
    while let Ok(first) = queue.recv() {
        let mut behind: HashMap<Arc<str>, u64> = HashMap::new();
        let mut stop = false;
        for next in std::iter::once(first).chain(queue.try_iter()) {
            match next {
                CatchUp::Behind(category, seq) => {
                    let newest = behind.entry(category).or_insert(seq);
                    *newest = (*newest).max(seq);
                }
                CatchUp::Stop => stop = true,
            }
        }
        for (category, seq) in behind {
            if let Some(after) = app.runtime.registry.announce(&category, seq) {
                read_after(app, reader, &category, after);
            }
        }
        if stop {
            return;
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
        let mut woken = Vec::new();
        app.runtime.publish(category, &events, &mut woken);
        app.runtime.answer(woken);
        if events.len() < READ_LIMIT {
            return;
        }
    }
}
