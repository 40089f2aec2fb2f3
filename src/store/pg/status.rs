//! The status page's and metrics' reads on PostgreSQL: the queries of the SQLite
//! `Reader` behind `/api/v1/status` and `/metrics`, with the same answers and the same
//! types, and the newest event time a node's clock starts from.
//!
//! What this relies on about PostgreSQL:
//!
//! - **One snapshot per view**: the status page's several statements run in one
//!   `REPEATABLE READ`, read-only transaction ([`super::read`]), so its streams, counts and
//!   consumers agree with each other as they do on SQLite; each metrics query is one
//!   statement, hence one snapshot already.
//! - **Names sort bytewise only when asked** (`COLLATE "C"`): a database created with a
//!   locale would otherwise order `B` before `a` differently from SQLite.
//! - **A portal hands rows over a page at a time**: the status page walks stream names
//!   through one, so it reads a few pages past the last stream it lists, never the whole
//!   catalogue.
//!
//! `the_status_and_metrics_reads_answer_as_sqlites_do` (in `tests/it/pg.rs`) checks the
//! answers, limits included.

use super::admin::{CONSUMERS, consumer_offset};
use super::read::snapshot;
use super::{Database, PgError};
use crate::store::admin::StreamSummary;
use crate::store::reader::{Overview, StreamStatus};

/// Stream rows the status page fetches from its portal at a time: a page of a few
/// kilobytes, enough that the streams it lists usually take one.
const PAGE: i32 = 128;

impl Database {
    /// Unacknowledged events per (stream, consumer, event name), for metrics.
    pub fn consumer_lag(&mut self) -> Result<Vec<(String, String, String, u64)>, PgError> {
        let rows = self.client.query(
            "SELECT s.name, o.consumer, o.name, \
             (SELECT count(*) FROM events e WHERE e.stream_id = o.stream_id \
              AND e.name = o.name AND e.seq > o.seq) \
             FROM offsets o JOIN streams s ON s.id = o.stream_id \
             ORDER BY s.name COLLATE \"C\", o.consumer COLLATE \"C\", o.name COLLATE \"C\"",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get::<_, i64>(3) as u64))
            .collect())
    }

    /// What interest retention held back at its last run, per (stream, consumer), for
    /// metrics.
    pub fn retention_held(&mut self) -> Result<Vec<(String, String, u64)>, PgError> {
        let rows = self.client.query(
            "SELECT s.name, h.consumer, h.events \
             FROM retention_held h JOIN streams s ON s.id = h.stream_id \
             ORDER BY s.name COLLATE \"C\", h.consumer COLLATE \"C\"",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
            .collect())
    }

    /// The first `max_streams` streams by name that `visible` admits, with their event
    /// counts and their first `max_consumers` consumers (in all), from one snapshot. Only
    /// the listed streams are counted, each through its key, so the work grows with what
    /// is listed and the events it holds, not with the streams skipped.
    pub fn overview(
        &mut self,
        visible: impl Fn(&str) -> bool,
        max_streams: usize,
        max_consumers: usize,
    ) -> Result<Overview, PgError> {
        let mut tx = snapshot(self)?;
        let names = tx.bind(
            "SELECT name, owner, last_seq, last_ms, id FROM streams ORDER BY name COLLATE \"C\"",
            &[],
        )?;
        let mut listed = Vec::new();
        let mut more_streams = false;
        'walk: loop {
            let page = tx.query_portal(&names, PAGE)?;
            for row in &page {
                let name: String = row.get(0);
                if !visible(&name) {
                    continue;
                }
                if listed.len() == max_streams {
                    more_streams = true;
                    break 'walk;
                }
                let summary = StreamSummary {
                    name,
                    owner: row.get(1),
                    events: 0,
                    last_seq: row.get::<_, i64>(2) as u64,
                    last_ms: row.get::<_, i64>(3) as u64,
                };
                listed.push((summary, row.get::<_, i64>(4)));
            }
            if page.len() < PAGE as usize {
                break;
            }
        }
        let consumers_of = tx.prepare(&format!("{CONSUMERS} LIMIT $2"))?;
        let mut streams = Vec::with_capacity(listed.len());
        let mut room = max_consumers;
        let mut more_consumers = false;
        for (mut summary, id) in listed {
            let count = tx.query_one("SELECT count(*) FROM events WHERE stream_id = $1", &[&id])?;
            summary.events = count.get::<_, i64>(0) as u64;
            let limit = i64::try_from(room).unwrap_or(i64::MAX - 1) + 1;
            let rows = tx.query(&consumers_of, &[&id, &limit])?;
            more_consumers |= rows.len() > room;
            let consumers: Vec<_> = rows.iter().take(room).map(consumer_offset).collect();
            room -= consumers.len();
            streams.push(StreamStatus { summary, consumers });
        }
        tx.commit()?;
        Ok(Overview {
            streams,
            more_streams,
            more_consumers,
        })
    }

    /// The newest event time of any stream (epoch ms; 0 when there is none), so that a
    /// node's clock never starts below a time already stored. The `streams` row keeps its
    /// stream's newest time whatever retention deleted since.
    pub fn newest_timestamp(&mut self) -> Result<u64, PgError> {
        let row = self
            .client
            .query_one("SELECT coalesce(max(last_ms), 0) FROM streams", &[])?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }
}
