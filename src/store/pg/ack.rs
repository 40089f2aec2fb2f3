//! ACKs on PostgreSQL: consumer offsets that only move forward, whichever node an ACK
//! reaches.
//!
//! An ACK is one `INSERT … ON CONFLICT DO UPDATE SET seq = GREATEST(…)`: PostgreSQL locks
//! the offset's row for the update, so two nodes acknowledging for one consumer at once
//! both apply, in some order, and the offset ends at the later event whatever that order.

use postgres::{Client, Transaction};
use uuid::Uuid;

use super::PgError;

/// One ACK of a batch: `consumer` has processed `stream`'s event `id` and every event of
/// its name before it.
pub struct Ack<'a> {
    /// Stream name.
    pub stream: &'a str,
    /// Consumer id.
    pub consumer: &'a str,
    /// The acknowledged event.
    pub id: Uuid,
}

/// Applies `batch` in one transaction; for each ACK, whether its event was found (a
/// `/publish` event has no name, hence no offset an ACK could move: not found either).
pub fn commit(client: &mut Client, batch: &[Ack<'_>]) -> Result<Vec<bool>, PgError> {
    let mut tx = client.transaction()?;
    let found = apply(&mut tx, batch)?;
    tx.commit()?;
    Ok(found)
}

/// Applies `batch` inside `tx`, which commits it with whatever else it holds.
pub(super) fn apply(tx: &mut Transaction<'_>, batch: &[Ack<'_>]) -> Result<Vec<bool>, PgError> {
    let ack = tx.prepare(
        "INSERT INTO offsets (stream_id, consumer, name, seq) \
         SELECT e.stream_id, $3, e.name, e.seq FROM events e \
         JOIN streams s ON s.id = e.stream_id \
         WHERE e.id = $1 AND s.name = $2 AND e.name IS NOT NULL \
         ON CONFLICT (stream_id, consumer, name) \
         DO UPDATE SET seq = GREATEST(offsets.seq, excluded.seq)",
    )?;
    let found = batch
        .iter()
        .map(|a| Ok(tx.execute(&ack, &[&a.id, &a.stream, &a.consumer])? == 1))
        .collect::<Result<_, PgError>>()?;
    Ok(found)
}
