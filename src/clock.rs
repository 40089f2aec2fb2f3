//! Event timestamps that never go backwards, and timeout answers that never skip an event.
//!
//! Long-poll clients resume with `since_time`, so two promises hold here rather than in the
//! callers: the timestamps the writer stamps on commits never decrease (even when the wall
//! clock steps back), and every event committed after a timeout answer carries a timestamp
//! greater than that answer's `timestamp` (golongpoll's Go client resumes from it).
//!
//! # Several nodes
//!
//! Nodes sharing a PostgreSQL database stamp one stream's events in turn, and a client may
//! resume on one node from another's timeout answer. Each node's clock therefore follows
//! the database server's ([`Clock::follow`]): its writer measures the offset when it
//! connects and every few seconds after, to within half a round trip. Appends also stamp
//! each stream no lower than its last event, so timestamps never decrease along a stream
//! whatever the clocks say; the second promise holds across nodes up to the difference
//! between two nodes' measurements (their round trips to the database, well under a
//! millisecond on one network), where one node holds it exactly.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by the wall clock (0 if the clock is before 1970).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The shared source of event and timeout timestamps.
#[derive(Debug, Default)]
pub struct Clock {
    state: Mutex<State>,
    /// Milliseconds added to the wall clock: the database's time less this host's, when
    /// the node shares a database; 0 otherwise.
    offset: AtomicI64,
}

#[derive(Debug, Default)]
struct State {
    /// The greatest timestamp given to a batch so far.
    last_event: u64,
    /// The greatest timestamp given to a timeout answer so far.
    last_answer: u64,
    /// The timestamp of the batch being committed, if one is in flight.
    in_flight: Option<u64>,
}

impl Clock {
    /// A clock that will never stamp below `floor` (the newest timestamp already on disk).
    pub fn starting_at(floor: u64) -> Clock {
        Clock {
            state: Mutex::new(State {
                last_event: floor,
                ..State::default()
            }),
            offset: AtomicI64::new(0),
        }
    }

    /// Follows a clock `offset_ms` ahead of this host's wall clock (behind, if negative)
    /// from now on. Stamps still never decrease, even if the offset does.
    pub fn follow(&self, offset_ms: i64) {
        self.offset.store(offset_ms, Ordering::Relaxed);
    }

    /// Now, by the clock followed.
    fn now(&self) -> u64 {
        let offset = self.offset.load(Ordering::Relaxed);
        wall_ms().saturating_add_signed(offset)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is three integers updated atomically under the lock; a panic elsewhere
        // cannot leave it half-written, so a poisoned lock is still good to use.
        crate::lock::lock(&self.state)
    }

    /// Stamps a batch about to be committed. Call [`Clock::batch_done`] once it is committed
    /// and its waiters were woken.
    pub fn stamp_batch(&self) -> u64 {
        let mut s = self.lock();
        let ts = self
            .now()
            .max(s.last_event)
            .max(s.last_answer.saturating_add(1));
        s.last_event = ts;
        s.in_flight = Some(ts);
        ts
    }

    /// Marks the batch stamped last as committed (or abandoned).
    pub fn batch_done(&self) {
        self.lock().in_flight = None;
    }

    /// The timestamp for a timeout answer: no event committed after this call gets a
    /// timestamp at or below it, and no event already committed is above it.
    pub fn answer_stamp(&self) -> u64 {
        let mut s = self.lock();
        let ts = match s.in_flight {
            // The batch in flight may commit after this answer is sent, so stay below it.
            Some(batch) => batch.saturating_sub(1),
            None => self.now().max(s.last_event),
        };
        s.last_answer = s.last_answer.max(ts);
        ts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_never_decrease_and_follow_answers() {
        let far_future = wall_ms() + 10_000_000;
        let clock = Clock::starting_at(far_future);
        let a = clock.stamp_batch();
        assert_eq!(a, far_future, "a clock behind the disk must not go back");
        clock.batch_done();
        let answer = clock.answer_stamp();
        assert_eq!(answer, far_future);
        let b = clock.stamp_batch();
        assert!(
            b > answer,
            "an event after a timeout answer must be newer than it"
        );
    }

    #[test]
    fn a_followed_clock_stamps_by_it_and_never_goes_back() {
        let clock = Clock::default();
        clock.follow(60_000);
        let ahead = clock.stamp_batch();
        assert!(ahead >= wall_ms() + 59_000, "{ahead}");
        clock.batch_done();
        clock.follow(-60_000);
        assert_eq!(clock.stamp_batch(), ahead, "stamps never decrease");
    }

    #[test]
    fn answer_during_a_batch_stays_below_it() {
        let clock = Clock::default();
        let batch = clock.stamp_batch();
        let answer = clock.answer_stamp();
        assert!(answer < batch);
        clock.batch_done();
        let later = clock.answer_stamp();
        assert!(
            later >= batch,
            "once committed, the batch is not above a later answer"
        );
        assert!(clock.stamp_batch() > later);
    }
}
