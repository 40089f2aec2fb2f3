//! Parked long-polls per category and their deadlines. No I/O, no threads: callers pass the
//! time in and answer what comes back, outside the lock.
//!
//! A category's entry holds its high-water mark (newest registered sequence number) and a
//! short tail of recent events, so a publish answers every waiter from memory and a client
//! resuming with `since_time`/`last_id` near the head needs no query. Checking for events
//! and parking happen under one lock against the high-water mark, so an event registered
//! between the two is never missed. Every parked reply leaves exactly once: through
//! [`Registry::publish`], [`Registry::expire`] or [`Registry::close`].

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::event::{Event, Start};

/// A request to wait for events.
pub struct Wait<R> {
    /// The parked reply, handed back when it is time to answer.
    pub reply: R,
    /// Only events with this name count (streams-API consumers); `None` for all.
    pub filter: Option<Box<str>>,
    /// Most events in one answer.
    pub limit: usize,
    /// When to give up and answer with a timeout.
    pub deadline: Instant,
}

/// What became of a poll.
pub enum Poll<R> {
    /// Events are ready now: answer with them.
    Ready(R, Vec<Arc<Event>>),
    /// The reply is parked; `earliest` says its deadline is now the first, so the timer
    /// must wake sooner.
    Parked {
        /// Whether the timer needs a poke.
        earliest: bool,
        /// The sequence number it waits after.
        cursor: u64,
    },
    /// Too many parked already: answer 503.
    Full(R),
    /// The registry is closed for shutdown: answer as if the deadline had passed.
    Closed(R),
    /// Memory cannot answer: read the store, then call [`Registry::park_after`].
    Unknown(R),
}

/// Replies woken by one publish that get the same events.
pub struct Woken<R> {
    /// The events, oldest first.
    pub events: Vec<Arc<Event>>,
    /// The replies to answer with them.
    pub replies: Vec<R>,
}

struct Category {
    /// Newest registered sequence number.
    hwm: u64,
    /// Recent events, contiguous and ending at `hwm` when not empty.
    tail: VecDeque<Arc<Event>>,
    /// Ids of the waiters parked here.
    waiting: Vec<u64>,
}

struct Waiter<R> {
    reply: R,
    category: Arc<str>,
    cursor: u64,
    filter: Option<Box<str>>,
    limit: usize,
    deadline: Instant,
}

struct Inner<R> {
    categories: HashMap<Arc<str>, Category>,
    waiters: HashMap<u64, Waiter<R>>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_id: u64,
    closed: bool,
}

/// The registry of parked replies.
pub struct Registry<R> {
    inner: Mutex<Inner<R>>,
    max_parked: usize,
    tail_len: usize,
}

impl<R> Registry<R> {
    /// A registry holding at most `max_parked` replies and `tail_len` recent events per
    /// category.
    pub fn new(max_parked: usize, tail_len: usize) -> Registry<R> {
        Registry {
            inner: Mutex::new(Inner {
                categories: HashMap::new(),
                waiters: HashMap::new(),
                deadlines: BTreeSet::new(),
                next_id: 0,
                closed: false,
            }),
            max_parked,
            tail_len: tail_len.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<R>> {
        // Every method leaves the maps consistent before it can panic (no user code runs
        // under the lock), so a poisoned lock is still good to use.
        crate::lock::lock(&self.inner)
    }

    /// Parked replies right now.
    pub fn parked(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Parked replies per category, for the status page: one pass over the parked
    /// replies, which `max_parked` bounds, rather than over every category ever seen.
    pub fn parked_by_category(&self) -> HashMap<Arc<str>, usize> {
        let inner = self.lock();
        let mut counts = HashMap::new();
        for waiter in inner.waiters.values() {
            *counts.entry(waiter.category.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// The earliest deadline of any parked reply.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().deadlines.first().map(|(at, _)| *at)
    }

    /// Answers from memory or parks, if memory knows enough about `category`.
    pub fn poll(&self, category: &str, start: &Start, wait: Wait<R>) -> Poll<R> {
        let mut inner = self.lock();
        let Some(cat) = inner.categories.get(category) else {
            return Poll::Unknown(wait.reply);
        };
        let cursor = match start {
            Start::Now => Some(cat.hwm),
            Start::After(seq) => Some(*seq),
            Start::Since { ms, last_id } => resolve_in_tail(cat, *ms, last_id.as_ref()),
        };
        match cursor {
            Some(cursor) => self.answer_or_park(&mut inner, category, cursor, wait),
            None => Poll::Unknown(wait.reply),
        }
    }

    /// Parks after the store showed nothing new up to sequence `seen`, unless events past it
    /// were registered meanwhile (then they are the answer).
    pub fn park_after(&self, category: &str, seen: u64, wait: Wait<R>) -> Poll<R> {
        let mut inner = self.lock();
        if !inner.categories.contains_key(category) {
            inner.categories.insert(
                category.into(),
                Category {
                    hwm: seen,
                    tail: VecDeque::new(),
                    waiting: Vec::new(),
                },
            );
        }
        self.answer_or_park(&mut inner, category, seen, wait)
    }

    fn answer_or_park(
        &self,
        inner: &mut Inner<R>,
        category: &str,
        mut cursor: u64,
        wait: Wait<R>,
    ) -> Poll<R> {
        let (key, cat) = inner
            .categories
            .get_key_value(category)
            .expect("callers checked the category exists");
        let key = key.clone();
        if cursor < cat.hwm {
            let Some(first) = cat.tail.front() else {
                return Poll::Unknown(wait.reply);
            };
            if first.seq > cursor + 1 {
                return Poll::Unknown(wait.reply);
            }
            let events: Vec<Arc<Event>> = cat
                .tail
                .iter()
                .filter(|e| e.seq > cursor && matches(e, wait.filter.as_deref()))
                .take(wait.limit)
                .cloned()
                .collect();
            if !events.is_empty() {
                return Poll::Ready(wait.reply, events);
            }
            // Nothing this waiter wants up to the head: wait from there.
            cursor = cat.hwm;
        }
        if inner.closed {
            return Poll::Closed(wait.reply);
        }
        if inner.waiters.len() >= self.max_parked {
            return Poll::Full(wait.reply);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let earliest = inner
            .deadlines
            .first()
            .is_none_or(|(first, _)| wait.deadline < *first);
        inner.deadlines.insert((wait.deadline, id));
        inner
            .categories
            .get_mut(category)
            .expect("checked above")
            .waiting
            .push(id);
        inner.waiters.insert(
            id,
            Waiter {
                reply: wait.reply,
                category: key,
                cursor,
                filter: wait.filter,
                limit: wait.limit,
                deadline: wait.deadline,
            },
        );
        Poll::Parked { earliest, cursor }
    }

    /// Registers events just committed to `category` (oldest first) and takes the waiters
    /// they answer. A waiter for which `resident` gives a handle (a stream, answered again
    /// and again) stays parked past the events, and the handle is woken in its place.
    ///
    /// Events registered already are skipped. `None` when the rest do not follow on from
    /// the category's high-water mark: another node committed the events between, and
    /// they must be read from the store before these (see [`Registry::announce`]); nothing
    /// is registered then. With one node, events always follow on.
    pub fn publish(
        &self,
        category: &str,
        events: &[Arc<Event>],
        resident: impl Fn(&R) -> Option<R>,
    ) -> Option<Vec<Woken<R>>> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let known = inner.categories.get(category).map(|cat| cat.hwm);
        let events = match known {
            Some(hwm) => &events[events.partition_point(|e| e.seq <= hwm)..],
            None => events,
        };
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Some(Vec::new());
        };
        if known.is_some_and(|hwm| first.seq > hwm + 1) {
            return None;
        }
        let cat = match inner.categories.get_mut(category) {
            Some(cat) => cat,
            None => inner
                .categories
                .entry(category.into())
                .or_insert_with(|| Category {
                    hwm: 0,
                    tail: VecDeque::new(),
                    waiting: Vec::new(),
                }),
        };
        if cat
            .tail
            .back()
            .is_some_and(|back| back.seq + 1 != first.seq)
        {
            cat.tail.clear();
        }
        cat.tail.extend(events.iter().cloned());
        while cat.tail.len() > self.tail_len {
            cat.tail.pop_front();
        }
        cat.hwm = cat.hwm.max(last.seq);

        let mut woken: Vec<Woken<R>> = Vec::new();
        let mut groups: HashMap<(u64, Option<Box<str>>, usize), usize> = HashMap::new();
        let mut still = Vec::with_capacity(cat.waiting.len());
        for id in cat.waiting.drain(..) {
            let w = inner.waiters.get_mut(&id).expect("waiting ids are parked");
            let wanted = |e: &&Arc<Event>| e.seq > w.cursor && matches(e, w.filter.as_deref());
            if !events.iter().any(|e| wanted(&e)) {
                w.cursor = w.cursor.max(last.seq);
                still.push(id);
                continue;
            }
            let handle = resident(&w.reply);
            let key = (w.cursor, w.filter.clone(), w.limit);
            let slot = *groups.entry(key).or_insert_with(|| {
                woken.push(Woken {
                    events: events
                        .iter()
                        .filter(|e| e.seq > w.cursor && matches(e, w.filter.as_deref()))
                        .take(w.limit)
                        .cloned()
                        .collect(),
                    replies: Vec::new(),
                });
                woken.len() - 1
            });
            if let Some(handle) = handle {
                w.cursor = w.cursor.max(last.seq);
                still.push(id);
                woken[slot].replies.push(handle);
                continue;
            }
            let w = inner.waiters.remove(&id).expect("just found");
            inner.deadlines.remove(&(w.deadline, id));
            woken[slot].replies.push(w.reply);
        }
        cat.waiting = still;
        Some(woken)
    }

    /// The categories polls are parked on, each with its high-water mark.
    #[cfg(feature = "postgres")]
    pub fn waited_on(&self) -> Vec<(Arc<str>, u64)> {
        let inner = self.lock();
        let waited = inner
            .categories
            .iter()
            .filter(|(_, cat)| !cat.waiting.is_empty());
        waited.map(|(name, cat)| (name.clone(), cat.hwm)).collect()
    }

    /// Takes note that `category`'s events up to `seq` are committed (by another node, or
    /// by this one's writer, whose own registration may come before or after this). A
    /// category nobody waits on just moves its high-water mark there, forgetting a tail
    /// that no longer reaches it, so a poll resolves its cursor from the store rather than
    /// from stale memory, and a poll parking on an older read is sent back to the store.
    /// `Some(hwm)` when waiters are parked behind `seq`: read the events after `hwm` from
    /// the store and [`Registry::publish`] them.
    #[cfg(feature = "postgres")]
    pub fn announce(&self, category: &str, seq: u64) -> Option<u64> {
        let mut inner = self.lock();
        let cat = inner
            .categories
            .entry(category.into())
            .or_insert_with(|| Category {
                hwm: seq,
                tail: VecDeque::new(),
                waiting: Vec::new(),
            });
        if cat.hwm >= seq {
            return None;
        }
        if !cat.waiting.is_empty() {
            return Some(cat.hwm);
        }
        cat.hwm = seq;
        cat.tail.clear();
        None
    }

    /// Takes every reply whose deadline is at or before `now`.
    pub fn expire(&self, now: Instant) -> Vec<R> {
        let mut inner = self.lock();
        let mut expired = Vec::new();
        while let Some(&(at, id)) = inner.deadlines.first() {
            if at > now {
                break;
            }
            inner.deadlines.pop_first();
            if let Some(w) = inner.waiters.remove(&id) {
                expired.push((w.category, id, w.reply));
            }
        }
        let mut by_category: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
        for (category, id, _) in &expired {
            by_category.entry(category.clone()).or_default().push(*id);
        }
        for (category, ids) in by_category {
            forget(&mut inner.categories, &category, &ids);
        }
        expired.into_iter().map(|(_, _, reply)| reply).collect()
    }

    /// Whether `pred` holds for any parked reply (a look before a costlier check that ends
    /// in [`Registry::take_where`]).
    pub fn any(&self, pred: impl Fn(&R) -> bool) -> bool {
        self.lock().waiters.values().any(|w| pred(&w.reply))
    }

    /// Takes every parked reply for which `pred` holds.
    pub fn take_where(&self, pred: impl Fn(&R) -> bool) -> Vec<R> {
        let mut inner = self.lock();
        let ids: Vec<u64> = inner
            .waiters
            .iter()
            .filter(|(_, w)| pred(&w.reply))
            .map(|(id, _)| *id)
            .collect();
        let mut taken = Vec::with_capacity(ids.len());
        let mut by_category: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
        for id in ids {
            let w = inner.waiters.remove(&id).expect("just found");
            inner.deadlines.remove(&(w.deadline, id));
            by_category.entry(w.category).or_default().push(id);
            taken.push(w.reply);
        }
        for (category, ids) in by_category {
            forget(&mut inner.categories, &category, &ids);
        }
        taken
    }

    /// Takes every parked reply and refuses new ones, for shutdown.
    pub fn close(&self) -> Vec<R> {
        let mut inner = self.lock();
        inner.closed = true;
        inner.deadlines.clear();
        for cat in inner.categories.values_mut() {
            cat.waiting.clear();
        }
        inner.categories.retain(|_, cat| cat.hwm > 0);
        inner.waiters.drain().map(|(_, w)| w.reply).collect()
    }
}

/// Removes expired waiter ids from a category, dropping the entry if it was only a
/// placeholder for a category that has never had an event.
fn forget(categories: &mut HashMap<Arc<str>, Category>, category: &str, ids: &[u64]) {
    let Some(cat) = categories.get_mut(category) else {
        return;
    };
    // A set: thousands of polls of one category can expire together.
    let ids: HashSet<u64> = ids.iter().copied().collect();
    cat.waiting.retain(|id| !ids.contains(id));
    if cat.waiting.is_empty() && cat.hwm == 0 {
        categories.remove(category);
    }
}

fn matches(event: &Event, filter: Option<&str>) -> bool {
    filter.is_none_or(|name| event.name.as_deref() == Some(name))
}

/// The cursor for `since_time`/`last_id` if the tail holds every event that decides it;
/// `None` sends the poll to the store.
fn resolve_in_tail(cat: &Category, ms: u64, last_id: Option<&uuid::Uuid>) -> Option<u64> {
    let (first, last) = (cat.tail.front()?, cat.tail.back()?);
    if let Some(id) = last_id
        && let Some(seen) = cat.tail.iter().find(|e| e.id == *id && e.ts == ms)
    {
        return Some(seen.seq);
    }
    // A client whose `since_time` reaches the newest event in memory may have read newer
    // ones from the store, committed but not yet registered here: only the store knows
    // where it stands. (Clients keeping up find their `last_id` in the tail above.)
    if last.ts <= ms {
        return None;
    }
    // Events at exactly `ms` are new when a last_id was given but is not among them, and
    // already seen when no last_id was given. The tail decides only if it reaches back past
    // every event that could count.
    let seen = |e: &&Arc<Event>| {
        if last_id.is_some() {
            e.ts < ms
        } else {
            e.ts <= ms
        }
    };
    if !seen(&first) {
        // Only when the tail starts at the stream's first event is nothing older on disk.
        return (first.seq == 1).then_some(0);
    }
    cat.tail.iter().take_while(seen).last().map(|e| e.seq)
}

#[cfg(test)]
mod tests;
