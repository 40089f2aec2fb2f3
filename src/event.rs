//! The committed event: one entry of a stream's append-only log, as both APIs see it.

use uuid::Uuid;

/// An event as stored: its place in the stream, its identity and its JSON data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the stream, gapless from 1.
    pub seq: u64,
    /// Commit time in epoch milliseconds; never decreases along a stream.
    pub ts: u64,
    /// The id clients see and acknowledge.
    pub id: Uuid,
    /// The streams-API event name; `None` for events published through `/publish`.
    pub name: Option<Box<str>>,
    /// JSON: the streams-API element for named events, the published `data` otherwise.
    pub data: Box<str>,
}

/// Writes `s` as a JSON string literal into `out`.
pub fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping is the reference; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).expect("a str always serializes"));
}

/// Where a reader starts in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// After the newest event: only events committed from now on.
    Now,
    /// golongpoll's `since_time` (epoch ms) and optional `last_id`: events newer than `ms`,
    /// plus those at exactly `ms` that came after `last_id` (all of them when `last_id` is
    /// not among them).
    Since {
        /// `since_time`.
        ms: u64,
        /// `last_id`.
        last_id: Option<Uuid>,
    },
    /// After a known sequence number.
    After(u64),
}
