//! Retention on PostgreSQL: SQLite's limits with SQLite's answers (`store::retention`), run
//! by one node at a time, in bounded chunks.
//!
//! The limits cut a prefix of each stream, as on SQLite: the events up to the newest
//! sequence number the count (`last_seq - max_events`) or the age (the newest event older
//! than `now - max_age`, by the same binary search reads use) reaches. With `acked_only`,
//! an event of that prefix stays while a consumer known on its stream (an offset for its
//! name) has not acknowledged it, and what each consumer holds back is written to
//! `retention_held`. Deleting never lets a sequence number be given twice: the `streams`
//! row keeps the newest one the stream gave ([`super::append`]), whatever is deleted.
//!
//! # A run, in chunks
//!
//! A run ([`Sweep`]) first lists the streams whose oldest stored event the limits reach
//! (one step down the primary key per stream), then visits them one after another, in
//! chunks: each chunk is a transaction of its own that visits (deletes or keeps) at most
//! [`CHUNK`] events, so a node's writer, which runs a chunk between two batches, holds its
//! producers up for one chunk at a time. A stream's cutoff is computed when the run reaches
//! it, from the time the run started. What `acked_only` keeps of a stream is counted over
//! its chunks and written when the run is done with the stream, replacing that stream's
//! rows: a stream's counts are always one run's, never half of two.
//!
//! # One node at a time
//!
//! A chunk runs only under the transaction advisory lock [`RETENTION_LOCK`], taken with
//! `pg_try_advisory_xact_lock`: a node that does not get it skips the rest of its run,
//! since another node is deleting what it would. Two runs may still take turns chunk by
//! chunk (the lock is let go at each commit), and that is safe: every cutoff a run
//! computed stays within the limits however far the stream has grown since, an event is
//! deleted only if it is still within one, and each stream's counts are written whole.
//!
//! # What this relies on about PostgreSQL
//!
//! - **Advisory locks are one lock space for every session**, transaction-level and
//!   session-level alike: one node's chunk excludes another's, and an operator holding
//!   [`RETENTION_LOCK`] (`SELECT pg_advisory_lock(…)`) pauses retention on every node.
//!   `a_node_skips_retention_while_another_holds_the_lock` (in `tests/it/pg.rs`, like every
//!   test named here) checks it; `two_nodes_retaining_at_once_keep_the_limits` runs two
//!   nodes' runs at once.
//! - **A `DELETE` of old events takes no lock an append waits for**: appends insert new
//!   rows and lock `streams` rows, which retention only reads; so chunks bound how long a
//!   node's own writer is busy, not other nodes' producers.
//!   `a_large_backlog_is_trimmed_in_bounded_chunks` appends between chunks.
//! - The limits' answers are SQLite's: `retention_keeps_the_newest_by_count_and_by_age`,
//!   `interest_retention_keeps_what_a_known_consumer_has_not_acknowledged`.

use std::collections::HashMap;

use postgres::Transaction;
use postgres::types::ToSql;

use super::read::seq_at_time;
use super::{Database, PgError};
use crate::store::Retention;

/// The transaction advisory lock retention's chunks run under ("evretain" in ASCII): held
/// by one node's chunk at a time; an operator who takes it pauses retention everywhere.
pub const RETENTION_LOCK: i64 = 0x6576_7265_7461_696e;

/// Most events one chunk visits (deleted or kept): about the work of a commit of appends,
/// as SQLite's chunk.
const CHUNK: i64 = 2_000;

/// What computing a stream's cutoff by age costs a chunk, in events: its binary search
/// takes about as many index lookups as a sequence number has bits in use, each about
/// the cost of visiting an event. So a chunk over many small streams stays bounded too.
const SEARCH: i64 = 32;

/// A retention run under way, one chunk (a transaction) at a time: see the module docs.
#[derive(Debug)]
pub struct Sweep {
    limits: Retention,
    /// The streams the run visits, by id, with their newest sequence number when it
    /// started; `None` until its first chunk listed them.
    streams: Option<Vec<(i64, i64)>>,
    /// Where the run is: `streams[next]`, whose events up to `after` are visited.
    next: usize,
    after: i64,
    /// `streams[next]`'s cutoff, once computed.
    cut: Option<i64>,
    /// `now - max_age` at the run's first chunk.
    before_ms: Option<i64>,
    /// What `acked_only` kept of `streams[next]` so far, per consumer.
    held: HashMap<String, i64>,
    /// Events the run deleted so far.
    deleted: u64,
}

impl Sweep {
    /// A run of `limits` over every stream.
    pub fn new(limits: Retention) -> Sweep {
        Sweep {
            limits,
            streams: None,
            next: 0,
            after: 0,
            cut: None,
            before_ms: None,
            held: HashMap::new(),
            deleted: 0,
        }
    }

    /// Ends the run where it is.
    fn stop(&mut self) {
        self.streams = Some(Vec::new());
        self.next = 0;
        self.deleted = 0;
    }

    /// Runs the next chunk in `tx`; returns whether chunks are left.
    fn chunk(&mut self, tx: &mut Transaction<'_>, now_ms: u64) -> Result<bool, PgError> {
        if self.streams.is_none() {
            self.streams = Some(self.list(tx, now_ms)?);
        }
        let mut budget = CHUNK;
        while budget > 0 {
            let Some(&(id, last_seq)) = self.streams.as_ref().and_then(|s| s.get(self.next)) else {
                break;
            };
            let cut = match self.cut {
                Some(cut) => cut,
                None => {
                    budget -= if self.before_ms.is_some() { SEARCH } else { 0 };
                    let cut = *self.cut.insert(self.cutoff(tx, id, last_seq)?);
                    if budget <= 0 {
                        break;
                    }
                    cut
                }
            };
            let first = tx.query_opt(
                "SELECT seq FROM events WHERE stream_id = $1 AND seq > $2 ORDER BY seq LIMIT 1",
                &[&id, &self.after],
            )?;
            match first.map(|r| r.get::<_, i64>(0)).filter(|seq| *seq <= cut) {
                Some(first) => {
                    let through = cut.min(first - 1 + budget);
                    self.visit(tx, id, first, through)?;
                    budget -= through - first + 1;
                    self.after = through;
                }
                None => {
                    self.finish(tx, id)?;
                    budget -= 1;
                }
            }
        }
        let streams = self.streams.as_ref().map_or(0, Vec::len);
        Ok(self.next < streams)
    }

    /// The streams whose oldest stored event the limits reach, with their newest
    /// sequence numbers; clears what `retention_held` says of every other stream.
    fn list(&mut self, tx: &mut Transaction<'_>, now_ms: u64) -> Result<Vec<(i64, i64)>, PgError> {
        let max_events = self
            .limits
            .max_events
            .map(|max| i64::try_from(max).unwrap_or(i64::MAX));
        self.before_ms = self
            .limits
            .max_age_ms
            .map(|age| i64::try_from(now_ms.saturating_sub(age)).unwrap_or(i64::MAX));
        // A limit that is not set is NULL, which reaches nothing.
        let rows = tx.query(
            "SELECT s.id, s.last_seq FROM streams s CROSS JOIN LATERAL \
             (SELECT seq, ts FROM events e WHERE e.stream_id = s.id ORDER BY seq LIMIT 1) f \
             WHERE f.seq <= s.last_seq - $1::BIGINT OR f.ts < $2::BIGINT ORDER BY s.id",
            &[&max_events, &self.before_ms],
        )?;
        let streams: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        match self.limits.acked_only {
            true => {
                let ids: Vec<i64> = streams.iter().map(|(id, _)| *id).collect();
                let sql = "DELETE FROM retention_held WHERE stream_id <> ALL($1)";
                tx.execute(sql, &[&ids])?
            }
            false => tx.execute("DELETE FROM retention_held", &[])?,
        };
        Ok(streams)
    }

    /// The last sequence number of stream `id` that the limits reach (0: none).
    fn cutoff(&self, tx: &mut Transaction<'_>, id: i64, last_seq: i64) -> Result<i64, PgError> {
        let by_count = self.limits.max_events.map_or(0, |max| {
            last_seq.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX))
        });
        let by_age = match self.before_ms {
            Some(before) => seq_at_time(tx, id, last_seq as u64, before, true)? as i64,
            None => 0,
        };
        Ok(by_count.max(by_age))
    }

    /// Deletes the events `first..=through` of stream `id` that the limits let go, and
    /// counts what `acked_only` keeps of them.
    fn visit(
        &mut self,
        tx: &mut Transaction<'_>,
        id: i64,
        first: i64,
        through: i64,
    ) -> Result<(), PgError> {
        let range: [&(dyn ToSql + Sync); 3] = [&id, &first, &through];
        if !self.limits.acked_only {
            let sql = "DELETE FROM events WHERE stream_id = $1 AND seq BETWEEN $2 AND $3";
            self.deleted += tx.execute(sql, &range)?;
            return Ok(());
        }
        self.deleted += tx.execute(
            "DELETE FROM events e WHERE stream_id = $1 AND seq BETWEEN $2 AND $3 \
             AND NOT EXISTS (SELECT 1 FROM offsets o WHERE o.stream_id = e.stream_id \
             AND o.name = e.name AND o.seq < e.seq)",
            &range,
        )?;
        // What is left of the range is held back, by whom.
        let kept = tx.query(
            "SELECT o.consumer, count(*) FROM events e JOIN offsets o \
             ON o.stream_id = e.stream_id AND o.name = e.name AND o.seq < e.seq \
             WHERE e.stream_id = $1 AND e.seq BETWEEN $2 AND $3 GROUP BY o.consumer",
            &range,
        )?;
        for row in kept {
            *self.held.entry(row.get(0)).or_default() += row.get::<_, i64>(1);
        }
        Ok(())
    }

    /// Done with stream `id`: writes what `acked_only` kept of it, and moves on.
    fn finish(&mut self, tx: &mut Transaction<'_>, id: i64) -> Result<(), PgError> {
        if self.limits.acked_only {
            tx.execute("DELETE FROM retention_held WHERE stream_id = $1", &[&id])?;
            let (consumers, events): (Vec<String>, Vec<i64>) = self.held.drain().unzip();
            tx.execute(
                "INSERT INTO retention_held (stream_id, consumer, events) \
                 SELECT $1, * FROM unnest($2::TEXT[], $3::BIGINT[])",
                &[&id, &consumers, &events],
            )?;
        }
        self.next += 1;
        self.after = 0;
        self.cut = None;
        Ok(())
    }
}

impl Database {
    /// Runs the next chunk of the retention run `sweep` (its first chunk takes `now_ms`,
    /// epoch ms, as the time the limits count age from); returns whether chunks are left.
    ///
    /// Returns `false` at once, ending the run, when another node's chunk holds
    /// [`RETENTION_LOCK`]: that node is deleting what this one would. A failed chunk
    /// deletes nothing and ends the run too; the next run starts over.
    pub fn retain(&mut self, sweep: &mut Sweep, now_ms: u64) -> Result<bool, PgError> {
        if sweep
            .streams
            .as_ref()
            .is_some_and(|s| sweep.next == s.len())
        {
            return Ok(false);
        }
        let mut tx = self.client.transaction()?;
        let lock = tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK]);
        let more = match lock.map(|row| row.get::<_, bool>(0)) {
            Ok(true) => sweep.chunk(&mut tx, now_ms).and_then(|more| {
                tx.commit()?;
                Ok(more)
            }),
            Ok(false) => Ok(false),
            Err(e) => Err(e.into()),
        };
        match more {
            Ok(true) => {}
            Ok(false) if sweep.deleted > 0 => {
                crate::log::info(&format!("retention deleted {} events", sweep.deleted));
                sweep.stop();
            }
            _ => sweep.stop(),
        }
        more
    }
}
