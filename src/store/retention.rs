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
//! [`CHUNK`] events in commit order, and the writer commits a batch of whatever else is
//! queued between two chunks. So the first run over a large database (`--retain-events` added to a server
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

/// Most events one chunk visits (deleted or kept), so that one transaction of retention
/// takes about as long as a commit of appends (`cargo bench --bench load -- retention`).
pub(super) const CHUNK: i64 = 2_000;

/// A retention run under way, one chunk (a transaction) at a time.
///
/// Its first chunk computes each stream's cutoff (into the temporary table `retain_cut`
/// of the writer's connection) and empties `retention_held`; then each chunk visits the
/// next [`CHUNK`] events in commit order (`gid`), deleting those at or below their
/// stream's cutoff, until it passes the newest event any cutoff reaches. Commit order,
/// not stream by stream, because a commit interleaves the streams it touches: one
/// stream's consecutive events lie one per table page when 64 streams are written
/// together, so deleting them stream by stream rewrites a page per event, where commit
/// order empties whole pages. What `acked_only` keeps of each chunk is added to
/// `retention_held`, so mid-run it counts what the run has seen so far.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sweep {
    limits: Retention,
    /// The newest event the cutoffs reach; `None` until the first chunk computed them.
    last_gid: Option<i64>,
    /// Events up to this one have been visited.
    after_gid: i64,
    /// Events deleted by the earlier chunks.
    deleted: usize,
}

impl Sweep {
    /// A run of `limits` over every stream.
    pub(super) fn new(limits: Retention) -> Sweep {
        Sweep {
            limits,
            last_gid: None,
            after_gid: 0,
            deleted: 0,
        }
    }

    /// The same run from its start, for a new connection (which has no `retain_cut`).
    pub(super) fn anew(self) -> Sweep {
        Sweep::new(self.limits)
    }

    /// Deletes in `tx` what the limits reach at `now_ms` (at the run's first chunk),
    /// visiting at most [`CHUNK`] events; returns where the next chunk starts, `None` once
    /// the run is done.
    pub(super) fn chunk(
        mut self,
        tx: &Transaction<'_>,
        now_ms: u64,
    ) -> Result<Option<Sweep>, StoreError> {
        let last_gid = match self.last_gid {
            Some(gid) => gid,
            None => *self.last_gid.insert(self.cut(tx, now_ms)?),
        };
        // Skip what earlier runs deleted: the oldest event left, by the rowid.
        let first: Option<i64> = tx
            .prepare_cached("SELECT gid FROM events WHERE gid > ?1 ORDER BY gid LIMIT 1")?
            .query_row([self.after_gid], |r| r.get(0))
            .optional()?;
        if let Some(first) = first.filter(|first| *first <= last_gid) {
            let through = last_gid.min(first - 1 + CHUNK);
            self.deleted += self.delete(tx, first - 1, through)?;
            self.after_gid = through;
            if through < last_gid {
                return Ok(Some(self));
            }
        }
        if self.deleted > 0 {
            crate::log::info(&format!("retention deleted {} events", self.deleted));
        }
        Ok(None)
    }

    /// Records every stream's cutoff in `retain_cut` and empties `retention_held`; returns
    /// the newest event the cutoffs reach (0: none). One lookup per stream.
    fn cut(&self, tx: &Transaction<'_>, now_ms: u64) -> Result<i64, StoreError> {
        tx.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS retain_cut \
             (stream_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL); \
             DELETE FROM temp.retain_cut; DELETE FROM retention_held;",
        )?;
        let streams: Vec<(i64, i64)> = tx
            .prepare_cached("SELECT id, last_seq FROM stream_heads")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut last_gid = 0;
        for (id, last_seq) in streams {
            let cutoff = cutoff(tx, &self.limits, id, last_seq, now_ms)?;
            let newest: Option<i64> = tx
                .prepare_cached(
                    "SELECT gid FROM events WHERE stream_id = ?1 AND seq <= ?2 \
                     ORDER BY seq DESC LIMIT 1",
                )?
                .query_row(params![id, cutoff], |r| r.get(0))
                .optional()?;
            if let Some(gid) = newest {
                tx.prepare_cached("INSERT INTO temp.retain_cut (stream_id, seq) VALUES (?1, ?2)")?
                    .execute(params![id, cutoff])?;
                last_gid = last_gid.max(gid);
            }
        }
        Ok(last_gid)
    }

    /// Deletes the events in `after + 1 ..= through` (by `gid`) that the limits let go,
    /// and counts what `acked_only` keeps of them; returns the events deleted.
    fn delete(&self, tx: &Transaction<'_>, after: i64, through: i64) -> Result<usize, StoreError> {
        // A stream without a cutoff has no row in retain_cut: `seq <= NULL` keeps its events.
        if !self.limits.acked_only {
            let sql = "DELETE FROM events WHERE gid > ?1 AND gid <= ?2 AND seq <= \
                       (SELECT seq FROM temp.retain_cut c WHERE c.stream_id = events.stream_id)";
            return Ok(tx.prepare_cached(sql)?.execute(params![after, through])?);
        }
        let deleted = tx
            .prepare_cached(
                "DELETE FROM events WHERE gid > ?1 AND gid <= ?2 AND seq <= \
                 (SELECT seq FROM temp.retain_cut c WHERE c.stream_id = events.stream_id) \
                 AND NOT EXISTS (SELECT 1 FROM offsets o WHERE o.stream_id = events.stream_id \
                 AND o.name = events.name AND o.seq < events.seq)",
            )?
            .execute(params![after, through])?;
        // What is left of the chunk within the cutoffs is held back, by whom.
        tx.prepare_cached(
            "INSERT INTO retention_held (stream_id, consumer, events) \
             SELECT e.stream_id, o.consumer, COUNT(*) FROM events e \
             JOIN temp.retain_cut c ON c.stream_id = e.stream_id \
             JOIN offsets o ON o.stream_id = e.stream_id AND o.name = e.name AND o.seq < e.seq \
             WHERE e.gid > ?1 AND e.gid <= ?2 AND e.seq <= c.seq \
             GROUP BY e.stream_id, o.consumer \
             ON CONFLICT (stream_id, consumer) DO UPDATE SET events = events + excluded.events",
        )?
        .execute(params![after, through])?;
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
