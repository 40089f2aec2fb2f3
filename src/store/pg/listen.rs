//! Cross-node wake-up: every append transaction announces, per stream it appended to, the
//! stream's newest sequence number on one channel ([`notice`]), and each node listens on
//! it with a connection of its own ([`Listener`]), so that a poll parked on one node is
//! answered by an append committed through another.
//!
//! A notification says "`<last seq> <stream name>`": the payload names the stream and how
//! far it now goes, so a node reads each woken stream once, from where its parked polls
//! are, and knows which polls it can leave parked.
//!
//! # What this relies on about PostgreSQL
//!
//! - **A notification is delivered only when its transaction commits**, and never when it
//!   rolls back: a node is woken for events it can read, never for a batch that failed.
//!   `a_notification_carries_the_stream_and_its_newest_seq_after_the_commit` (in
//!   `tests/it/pg.rs`, like every test named here) checks that none arrives before the
//!   commit.
//! - **Notifications arrive in commit order**, and **PostgreSQL drops a duplicate (same
//!   channel, same payload) within one transaction**: [`Listener::wait`] keeps the highest
//!   sequence number per stream anyway, so one wake-up reads each stream once
//!   (`appends_to_one_stream_in_one_batch_wake_once_with_the_highest_seq`).
//! - **A payload must be shorter than 8000 bytes** (NOTIFY's limit), which ours always is: a
//!   stream name is at most 1,024 bytes (the APIs refuse longer ones), and a sequence number
//!   at most 20 digits. Names are sent as they are, spaces and any UTF-8 included: the
//!   sequence number comes first and ends at the first space
//!   (`a_stream_name_with_spaces_and_unicode_round_trips`).
//! - **A listener whose connection ends is told so**, rather than waiting forever, whether
//!   the server says why (its backend terminated) or the connection just ends (its backend
//!   killed): `a_listener_whose_backend_is_gone_returns_an_error`. Notifications sent while
//!   it was gone are lost, so its owner re-reads what it waits on once it listens again.
//!   A server that vanishes without closing the connection (its host powered off) is only
//!   noticed when TCP gives up on it: the owner should not rely on hearing nothing.

use std::collections::HashMap;
use std::time::Duration;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::PgError;

/// The channel every node's appends are announced on and every node listens to.
pub(super) const CHANNEL: &str = "eventserver";

/// The notice that `stream` now goes up to `last_seq`, which the append transaction sends
/// on [`CHANNEL`]; the other nodes hear it once it commits.
pub(super) fn notice(stream: &str, last_seq: u64) -> String {
    format!("{last_seq} {stream}")
}

/// A connection that listens for the appends of every node.
pub struct Listener {
    client: Client,
}

impl Listener {
    /// Connects to the database `url` names and listens from now on.
    pub fn connect(url: &str) -> Result<Listener, PgError> {
        let mut client = super::connect(url)?;
        client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        Ok(Listener { client })
    }

    /// Waits up to `timeout` for an append, then takes whatever else has already arrived
    /// without waiting: each stream appended to with the newest sequence number heard for
    /// it, in no particular order; empty if `timeout` passed with none. An error means the
    /// connection is lost: connect again, and re-read what was waited on, since what was
    /// announced meanwhile was not heard.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<(String, u64)>, PgError> {
        let mut newest: HashMap<String, u64> = HashMap::new();
        let mut heard = |payload: &str| {
            // Another program's payload on our channel is not ours to act on.
            let Some((seq, stream)) = payload.split_once(' ') else {
                return;
            };
            let Ok(seq) = seq.parse::<u64>() else {
                return;
            };
            let entry = newest.entry(stream.to_owned()).or_default();
            *entry = (*entry).max(seq);
        };
        // A connection that ends while waiting (its server's error message, or just its
        // end) is an error of the iterator: the crate reports a stream that ends as "closed".
        {
            let mut notifications = self.client.notifications();
            let first = notifications.timeout_iter(timeout).next()?;
            if let Some(first) = first {
                heard(first.payload());
                let mut rest = notifications.iter();
                while let Some(next) = rest.next()? {
                    heard(next.payload());
                }
            }
        }
        Ok(newest.into_iter().collect())
    }
}
