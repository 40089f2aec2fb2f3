//! Server-Sent Events on the long-poll view: `GET /events?category=C` with
//! `Accept: text/event-stream` answers `text/event-stream` and stays open. Each event is one
//! message whose `id:` is the event id and whose `data:` is the event object a long-poll
//! answer carries; `Last-Event-ID` (or `since_time`/`last_id`) resumes right after an event.
//!
//! # How a stream lives without a thread of its own
//!
//! A stream is a resident waiter in the long-poll registry: it takes a place under the
//! parked-poll cap, and the commit that wakes parked polls hands it its events
//! (`Runtime::answer`). The events are queued on the stream by the committing thread, in
//! commit order, then written by a worker; a stream skips what it has queued already, so
//! the paths that feed it (the first catch-up, commits, the heartbeat's re-park) can
//! overlap without sending an event twice. Its registry deadline is its next heartbeat: the
//! timer takes it out, queues a comment line (which keeps idle proxies from closing the
//! stream), and parks it again from its last event, until its lifetime ends. Then it
//! closes, and the client reconnects after the `retry:` it was sent first, with
//! `Last-Event-ID`.
//!
//! The connection is handed over by the HTTP layer after the head (`Handover`) as a
//! non-blocking [`Pipe`]: a write takes what the socket takes and never waits, so a reader
//! that stops reading delays nobody. What the socket does not take waits in the stream's
//! buffer; past [`MAX_PENDING`] bytes the stream is closed
//! (`sse::a_reader_that_stops_reading_is_cut_and_others_still_get_their_events`). No thread
//! is spent on a stream beyond tiny_http's own for its connection (`http::exchange` says
//! when that one ends early), and answers pipelined behind a stream wait in the HTTP
//! layer's order book, not on a worker
//! (`sse::a_request_pipelined_behind_a_stream_leaves_the_workers_free`).
//!
//! A client that hangs up is noticed when a write fails: at the latest at the second
//! heartbeat after it left (the first write after the hang-up still succeeds). Until then
//! its stream holds its parked place.
//!
//! A stream that would find the cap reached is refused with 503 before its head is sent.
//! Another taking the last place between that check and the park closes the new stream
//! right after its head: the client retries after `retry:`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{Api, Failure};
use super::longpoll::{event_object, stream_params, subscription};
use super::{App, Handover, Parked, Pipe, Reply, Request, Response, Want};
use crate::event::{Event, Start};
use crate::lock::lock;
use crate::store::Reader;

/// Bytes a stream may hold that its client has not taken; beyond them it is closed. About
/// a hundred large events, or a long backlog of small ones: enough for a reader that keeps
/// up, little next to the kernel's own socket buffers.
const MAX_PENDING: usize = 1 << 20;

/// How long an `EventSource` waits before it reconnects after a stream closes.
const RETRY_MS: u64 = 1_000;

/// Whether `req` asks for a stream of events rather than one long-poll answer.
pub(super) fn wanted(req: &Request) -> bool {
    req.header("Accept")
        .is_some_and(|accept| accept.contains("text/event-stream"))
}

/// `GET` on the subscribe path with `Accept: text/event-stream`.
pub(super) fn subscribe(app: &App, reader: &mut Reader, req: Request, reply: Reply) {
    let checked = subscription(app, reader, &req, stream_params).and_then(|(category, start)| {
        let start = resume(reader, &req, &category, start)?;
        Ok((pinned(reader, &category, start)?, category))
    });
    let (start, category) = match checked {
        Ok(checked) => checked,
        Err(failure) => return reply.send(failure.render(Api::LongPoll)),
    };
    if app.runtime.registry.parked() >= app.config.max_parked {
        return reply.send(Failure::TooManyParked.render(Api::LongPoll));
    }
    let config = &app.config;
    let sse = Arc::new(Sse::new(
        &category,
        Instant::now() + config.sse_lifetime,
        config.sse_heartbeat,
    ));
    let attach = sse.clone();
    reply.send(Response {
        status: 200,
        headers: vec![
            ("Content-Type", "text/event-stream".into()),
            ("Cache-Control", "no-cache".into()),
            // nginx would otherwise buffer the stream.
            ("X-Accel-Buffering", "no".into()),
        ],
        body: Arc::from(&b""[..]),
        stream: Some(Handover::new(move |pipe| attach.attach(pipe))),
    });
    let want = Want {
        start,
        filter: None,
        limit: config.longpoll_max_batch,
        timeout: config.sse_heartbeat.min(config.sse_lifetime),
    };
    let parked = Parked::streaming(sse, req.remote);
    app.runtime.wait(reader, &category, want, parked);
}

/// `start`, with "from now on" fixed at the newest event before the head goes out: the
/// client sees the stream open and may publish at once, and that event is after the start,
/// whenever the stream is parked
/// (`sse::a_stream_delivers_events_from_before_and_after_it_opened_in_order_once`).
fn pinned(reader: &mut Reader, category: &str, start: Start) -> Result<Start, Failure> {
    if start != Start::Now {
        return Ok(start);
    }
    match reader.since(category, &start, None, 0) {
        Ok(view) => Ok(Start::After(view.hwm)),
        Err(e) => Err(Failure::from_store(
            &e,
            "reading where a stream starts",
            Failure::StreamUnreadable,
        )),
    }
}

/// Where a stream starts: right after the `Last-Event-ID` event when the client sends one
/// (a reconnecting `EventSource` does), else where the query says. An id that is not
/// stored (never, or no longer) starts from the oldest event kept, so nothing is lost.
fn resume(reader: &Reader, req: &Request, category: &str, start: Start) -> Result<Start, Failure> {
    let Some(raw) = req.header("Last-Event-ID").filter(|v| !v.trim().is_empty()) else {
        return Ok(start);
    };
    let id = uuid::Uuid::parse_str(raw.trim()).map_err(|_| {
        Failure::BadSubscription("Header 'Last-Event-ID' is not an event id.".into())
    })?;
    match reader.seq_of(category, &id) {
        Ok(Some(seq)) => Ok(Start::After(seq)),
        Ok(None) => Ok(Start::Since {
            ms: 0,
            last_id: None,
        }),
        Err(e) => Err(Failure::from_store(
            &e,
            "looking up Last-Event-ID",
            Failure::StreamUnreadable,
        )),
    }
}

/// Events rendered as stream messages, each with its sequence number: rendered once per
/// wake-up, copied into every stream it wakes.
pub(crate) type Messages = Vec<(u64, Vec<u8>)>;

/// `events` of `category` as messages: `id:` and the event object as `data:`, one `data:`
/// line per line of the object (posted JSON may span lines; a client joins them back).
pub(crate) fn messages(category: &str, events: &[Arc<Event>]) -> Messages {
    events
        .iter()
        .map(|e| {
            let mut object = String::new();
            event_object(&mut object, category, e);
            let mut message = format!("id: {}\n", e.id.hyphenated());
            for line in object.split(['\r', '\n']).filter(|l| !l.is_empty()) {
                message.push_str("data: ");
                message.push_str(line);
                message.push('\n');
            }
            message.push('\n');
            (e.seq, message.into_bytes())
        })
        .collect()
}

/// One open stream: its category, its bounds, and what is queued for its client.
pub(crate) struct Sse {
    /// The category streamed.
    pub(crate) category: Arc<str>,
    /// When the stream closes, for its client to reconnect.
    pub(crate) ends: Instant,
    /// How often it sends a comment line when nothing else.
    pub(crate) heartbeat: Duration,
    state: Mutex<State>,
}

/// What a stream holds between writes.
struct State {
    /// The connection, once the head is written.
    pipe: Option<Box<dyn Pipe>>,
    /// Bytes the connection has not taken yet.
    pending: Vec<u8>,
    /// The sequence number the stream has seen up to: of the newest event queued, or
    /// where it parked.
    last_seq: u64,
    /// Set when the stream is to end: the next flush writes what it can and hangs up.
    closed: bool,
}

impl Sse {
    /// A stream of `category` that closes at `ends`, beating every `heartbeat`.
    pub(crate) fn new(category: &str, ends: Instant, heartbeat: Duration) -> Sse {
        Sse {
            category: category.into(),
            ends,
            heartbeat,
            state: Mutex::new(State {
                pipe: None,
                pending: format!("retry: {RETRY_MS}\n\n").into_bytes(),
                last_seq: 0,
                closed: false,
            }),
        }
    }

    /// The connection, after the head was written; `None` if it could not be handed over.
    fn attach(&self, pipe: Option<Box<dyn Pipe>>) {
        {
            let mut state = lock(&self.state);
            match pipe {
                Some(pipe) => state.pipe = Some(pipe),
                None => state.closed = true,
            }
        }
        self.flush();
    }

    /// Queues the messages of events newer than any queued before; `false` once the stream
    /// is closed (its buffer may have just overflowed).
    pub(crate) fn queue(&self, messages: &Messages) -> bool {
        let mut state = lock(&self.state);
        if state.closed {
            return false;
        }
        for (seq, message) in messages {
            if *seq > state.last_seq {
                state.pending.extend_from_slice(message);
                state.last_seq = *seq;
            }
        }
        state.overflowed();
        !state.closed
    }

    /// Queues `events` of this stream's category (see [`Sse::queue`]).
    pub(crate) fn queue_events(&self, events: &[Arc<Event>]) -> bool {
        self.queue(&messages(&self.category, events))
    }

    /// Queues a heartbeat comment; `false` once the stream is closed.
    pub(crate) fn beat(&self) -> bool {
        let mut state = lock(&self.state);
        if state.closed {
            return false;
        }
        state.pending.extend_from_slice(b":\n\n");
        state.overflowed();
        !state.closed
    }

    /// Records that the stream parked after sequence number `cursor`: it has seen the
    /// category up to there, events or not.
    pub(crate) fn seen(&self, cursor: u64) {
        let mut state = lock(&self.state);
        state.last_seq = state.last_seq.max(cursor);
    }

    /// The sequence number to resume after.
    pub(crate) fn last_seq(&self) -> u64 {
        lock(&self.state).last_seq
    }

    /// Whether the stream has ended or is about to.
    pub(crate) fn closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Marks the stream to end at its next flush.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
    }

    /// Writes what the connection takes now, without waiting, and hangs up on a closed
    /// stream (outside the lock). A client that hung up is noticed by a write failing: at
    /// the latest the second heartbeat after it left.
    pub(crate) fn flush(&self) {
        let gone = {
            let mut state = lock(&self.state);
            let state = &mut *state;
            if let Some(pipe) = state.pipe.as_mut() {
                while !state.pending.is_empty() {
                    match pipe.try_write(&state.pending) {
                        Ok(0) => break,
                        Ok(n) => drop(state.pending.drain(..n)),
                        Err(_) => {
                            state.closed = true;
                            break;
                        }
                    }
                }
            }
            if state.closed {
                state.pending = Vec::new();
                state.pipe.take()
            } else {
                None
            }
        };
        drop(gone);
    }
}

impl State {
    /// Closes the stream if its client has left too much unread.
    fn overflowed(&mut self) {
        if self.pending.len() > MAX_PENDING {
            self.closed = true;
        }
    }
}
