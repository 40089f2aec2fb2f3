//! Retention: deleting each stream's oldest events beyond a count or an age, optionally
//! only those every known consumer has acknowledged.
//!
//! Timestamps never decrease along a stream's sequence, so both limits cut a prefix: the
//! events up to one sequence number. Sequence numbers and offsets stay as they are; later
//! events keep theirs.
//!
//! With `acked_only` (interest retention), an event within that prefix is kept while a
//! consumer known on its stream has not acknowledged it: a consumer is known on a stream
//! from its first ACK of an event name there (its offset row), and it holds back the
//! events of that name beyond its offset. Events of names no consumer has acknowledged, and
//! events published without a name, go as usual. What each consumer holds back is written
//! to `retention_held` at every run, for `/metrics` and `stream show`; a consumer that went
//! away for good is dropped with `consumer remove`, which lets the next run delete them.
//!
//! A run goes in chunks ([`Sweep`]): each is a transaction of its own that visits at most
//! [`CHUNK`] events, and the writer commits a batch of whatever else is queued between two
//! chunks. So the first run over a large database (`--retain-events` added to a server
//! holding millions of events) holds producers up for one chunk at a time, never for the
//! whole run: `cargo bench --bench load -- retention` publishes while it trims 1,000,000
//! events, and `retention::a_large_backlog_is_trimmed_in_chunks_between_appends` checks
//! that appends are answered meanwhile.

use rusqlite::{OptionalExtension, Transaction, params};

use super::StoreError;

/// The limits of one retention run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many events per stream.
    pub max_events: Option<u64>,
    /// Keep events at most this old (milliseconds) per stream.
    pub max_age_ms: Option<u64>,
    /// Delete only events every consumer known on their stream has acknowledged.
    pub acked_only: bool,
}

/// Most events one chunk visits (deleted or held back), so that one transaction of
/// retention takes about as long as a commit of appends (`cargo bench --bench load --
/// retention`); visiting a stream counts as one.
pub(super) const CHUNK: i64 = 2_000;

/// A retention run under way, one chunk (a transaction) at a time: its limits, and where
/// its next chunk starts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sweep {
    limits: Retention,
    /// The stream the next chunk starts with (streams go by id)…
    stream: i64,
    /// …and the sequence number in it deleted through so far (0: not started).
    through: i64,
    /// Events deleted by the earlier chunks.
    deleted: usize,
}

impl Sweep {
    /// A run of `limits` over every stream, from the first.
    pub(super) fn new(limits: Retention) -> Sweep {
        Sweep {
            limits,
            stream: 0,
            through: 0,
            deleted: 0,
        }
    }

    /// Deletes in `tx` what the limits reach at `now_ms`, visiting at most [`CHUNK`] events,
    /// and returns where the next chunk starts; `None` once every stream is done.
    ///
    /// A stream's prefix goes as a range of sequence numbers from its first stored event,
    /// so a chunk never walks what earlier runs deleted, and each range is bounded by the
    /// events left to visit. What a range keeps under `acked_only` is added to
    /// `retention_held` as the range is done; a stream's rows there are emptied when the
    /// run reaches it, so mid-run they count what the run has seen so far.
    pub(super) fn chunk(
        mut self,
        tx: &Transaction<'_>,
        now_ms: u64,
    ) -> Result<Option<Sweep>, StoreError> {
        let streams: Vec<(i64, i64)> = tx
            .prepare_cached("SELECT id, last_seq FROM streams WHERE id >= ?1 ORDER BY id")?
            .query_map([self.stream], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut left = CHUNK;
        for (id, last_seq) in streams {
            if left <= 0 {
                (self.stream, self.through) = (id, 0);
                return Ok(Some(self));
            }
            left -= 1;
            let from = match id == self.stream {
                true => self.through,
                false => 0,
            };
            if from == 0 {
                tx.prepare_cached("DELETE FROM retention_held WHERE stream_id = ?1")?
                    .execute([id])?;
            }
            let cutoff = cutoff(tx, &self.limits, id, last_seq, now_ms)?;
            let first: Option<i64> = tx
                .prepare_cached(
                    "SELECT seq FROM events WHERE stream_id = ?1 AND seq > ?2 \
                     ORDER BY seq LIMIT 1",
                )?
                .query_row(params![id, from], |r| r.get(0))
                .optional()?;
            let Some(first) = first.filter(|first| *first <= cutoff) else {
                continue;
            };
            let after = first - 1;
            let through = cutoff.min(after + left);
            left -= through - after;
            self.deleted += self.delete(tx, id, after, through)?;
            if through < cutoff {
                (self.stream, self.through) = (id, through);
                return Ok(Some(self));
            }
        }
        if self.deleted > 0 {
            crate::log::info(&format!("retention deleted {} events", self.deleted));
        }
        Ok(None)
    }

    /// Deletes the events of stream `id` in `after + 1 ..= through` that the limits let go,
    /// and counts what `acked_only` keeps of them; returns the events deleted.
    fn delete(
        &self,
        tx: &Transaction<'_>,
        id: i64,
        after: i64,
        through: i64,
    ) -> Result<usize, StoreError> {
        if !self.limits.acked_only {
            let sql = "DELETE FROM events WHERE stream_id = ?1 AND seq > ?2 AND seq <= ?3";
            return Ok(tx
                .prepare_cached(sql)?
                .execute(params![id, after, through])?);
        }
        let deleted = tx
            .prepare_cached(
                "DELETE FROM events WHERE stream_id = ?1 AND seq > ?2 AND seq <= ?3 \
                 AND NOT EXISTS (SELECT 1 FROM offsets o WHERE o.stream_id = ?1 \
                 AND o.name = events.name AND o.seq < events.seq)",
            )?
            .execute(params![id, after, through])?;
        // What is left of the range is held back, by whom.
        tx.prepare_cached(
            "INSERT INTO retention_held (stream_id, consumer, events) \
             SELECT ?1, o.consumer, COUNT(*) FROM events e JOIN offsets o \
             ON o.stream_id = e.stream_id AND o.name = e.name AND o.seq < e.seq \
             WHERE e.stream_id = ?1 AND e.seq > ?2 AND e.seq <= ?3 GROUP BY o.consumer \
             ON CONFLICT (stream_id, consumer) DO UPDATE SET events = events + excluded.events",
        )?
        .execute(params![id, after, through])?;
        Ok(deleted)
    }
}

/// The last sequence number of stream `id` that the limits reach (0: none).
fn cutoff(
    tx: &Transaction<'_>,
    limits: &Retention,
    id: i64,
    last_seq: i64,
    now_ms: u64,
) -> Result<i64, StoreError> {
    let by_count = limits.max_events.map_or(0, |max| {
        last_seq.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX))
    });
    let by_age = match limits.max_age_ms {
        Some(age) => {
            let before = now_ms.saturating_sub(age) as i64;
            super::seq_at_time(tx, id, before, true)? as i64
        }
        None => 0,
    };
    Ok(by_count.max(by_age))
}
