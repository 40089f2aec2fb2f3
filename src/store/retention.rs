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

use rusqlite::{Transaction, params};

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

/// Applies `limits` to every stream at time `now_ms`; returns the events deleted.
pub(super) fn run(
    tx: &Transaction<'_>,
    limits: &Retention,
    now_ms: u64,
) -> Result<usize, StoreError> {
    let streams: Vec<(i64, i64)> = tx
        .prepare_cached("SELECT id, last_seq FROM streams")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut delete = tx.prepare_cached(if limits.acked_only {
        "DELETE FROM events WHERE stream_id = ?1 AND seq <= ?2 AND NOT EXISTS \
         (SELECT 1 FROM offsets o WHERE o.stream_id = ?1 AND o.name = events.name \
          AND o.seq < events.seq)"
    } else {
        "DELETE FROM events WHERE stream_id = ?1 AND seq <= ?2"
    })?;
    tx.execute("DELETE FROM retention_held", [])?;
    let mut deleted = 0;
    for (id, last_seq) in streams {
        let cutoff = cutoff(tx, limits, id, last_seq, now_ms)?;
        if cutoff == 0 {
            continue;
        }
        deleted += delete.execute(params![id, cutoff])?;
        if limits.acked_only {
            // What is left of the prefix is held back, by whom.
            tx.prepare_cached(
                "INSERT INTO retention_held (stream_id, consumer, events) \
                 SELECT ?1, o.consumer, COUNT(*) FROM events e JOIN offsets o \
                 ON o.stream_id = e.stream_id AND o.name = e.name AND o.seq < e.seq \
                 WHERE e.stream_id = ?1 AND e.seq <= ?2 GROUP BY o.consumer",
            )?
            .execute(params![id, cutoff])?;
        }
    }
    if deleted > 0 {
        crate::log::info(&format!("retention deleted {deleted} events"));
    }
    Ok(deleted)
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
