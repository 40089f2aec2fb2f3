//! Answering each request exactly once, in its connection's order.
//!
//! tiny_http 0.12 writes a connection's answers in the order it read the requests:
//! answering a request pipelined behind an unanswered one (a parked long-poll), or behind
//! an answer still being written, blocks the answering thread until that one is out
//! (`abuse::a_request_pipelined_behind_a_parked_long_poll_leaves_the_worker_free`,
//! `abuse::a_client_that_never_reads_its_answers_holds_one_worker_at_most`). So requests
//! are numbered per connection as they are taken from tiny_http ([`number`]), and an
//! answer that cannot be written at once waits in [`AnswerOrder`] for the thread writing
//! the one before it, or for a short-lived writer of its own; no worker ever blocks behind
//! another request's answer.
//!
//! A streamed answer (Server-Sent Events) goes on after its head is written: its request
//! stays unanswered in the book ([`AnswerOrder::answer_held`]) until the stream ends
//! ([`Release`]), so an answer pipelined behind it waits here rather than in tiny_http,
//! where it would hold a worker for the stream's life.
//!
//! The bookkeeping ([`AnswerOrder`]) knows nothing of tiny_http: it is generic over the
//! answer it holds, and unit-tested below.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use super::exchange::write_response;
use super::{Shared, lock, spawn_small};
use crate::api;

/// Unanswered requests one connection may have before more get 503 at once.
const MAX_PIPELINED: usize = 64;

/// A request's connection, its place among the connection's requests, and whether it is
/// one unanswered request too many.
#[derive(Clone, Copy)]
pub(super) struct Order {
    peer: SocketAddr,
    seq: u64,
    pub(super) flooding: bool,
}

/// Numbers `rq` on its connection (none without a peer address: it is answered unordered).
pub(super) fn number(shared: &Shared, rq: &tiny_http::Request) -> Option<Order> {
    let peer = *rq.remote_addr()?;
    Some(lock(&shared.order).number(peer))
}

/// Per connection (by peer address), the requests not yet answered and the answers waiting
/// for their turn. `A` is the answer held: a tiny_http request with its response in the
/// server, anything in the tests.
pub(super) struct AnswerOrder<A> {
    connections: HashMap<SocketAddr, Outstanding<A>>,
}

impl<A> Default for AnswerOrder<A> {
    fn default() -> Self {
        AnswerOrder {
            connections: HashMap::new(),
        }
    }
}

/// One connection's requests not yet answered, and the answers waiting to be written.
struct Outstanding<A> {
    /// The number the connection's next request gets.
    next: u64,
    unanswered: BTreeSet<u64>,
    /// Answers waiting to be written after earlier ones, by request number.
    ready: BTreeMap<u64, A>,
    /// Whether some thread is writing this connection's answers (then it also writes
    /// `ready` as far as it can).
    writing: bool,
}

impl<A> Default for Outstanding<A> {
    fn default() -> Self {
        Outstanding {
            next: 0,
            unanswered: BTreeSet::new(),
            ready: BTreeMap::new(),
            writing: false,
        }
    }
}

/// What the thread that answered a request does next.
#[derive(Debug, PartialEq)]
pub(super) enum Turn<A> {
    /// Write it now, then whatever became writable meanwhile ([`AnswerOrder::next_to_write`]
    /// until it returns `None`): this thread is the connection's writer.
    Write(A),
    /// Write it now; its connection is not tracked, so nothing waits on it.
    Unordered(A),
    /// Nothing: it waits for an earlier answer, and whoever writes that one writes it.
    Wait,
    /// It is held but writable now and no one is writing: start a writer, which calls
    /// [`AnswerOrder::next_to_write`] until it returns `None`.
    StartWriter,
}

impl<A> Outstanding<A> {
    /// The next ready answer whose predecessors are all answered.
    fn take_writable(&mut self) -> Option<A> {
        if !self.has_writable() {
            return None;
        }
        self.ready.pop_first().map(|(_, answer)| answer)
    }

    /// Whether the first ready answer could be written now.
    fn has_writable(&self) -> bool {
        // A ready answer is unanswered only when it is held (a stream's head): it may go.
        self.ready
            .first_key_value()
            .is_some_and(|(seq, _)| self.unanswered.first().is_none_or(|first| first >= seq))
    }

    /// Whether nothing is left to track: every request answered and written.
    fn idle(&self) -> bool {
        self.unanswered.is_empty() && self.ready.is_empty() && !self.writing
    }
}

impl<A> AnswerOrder<A> {
    /// Numbers the next request on `peer`'s connection and counts it unanswered.
    pub(super) fn number(&mut self, peer: SocketAddr) -> Order {
        let entry = self.connections.entry(peer).or_default();
        let seq = entry.next;
        entry.next += 1;
        entry.unanswered.insert(seq);
        Order {
            peer,
            seq,
            flooding: entry.unanswered.len() > MAX_PIPELINED,
        }
    }

    /// Records `answer` for the request `order` numbered, and says who writes it.
    pub(super) fn answer(&mut self, order: Order, answer: A) -> Turn<A> {
        self.record(order, answer, false)
    }

    /// Like [`AnswerOrder::answer`], for an answer that goes on after it is written (a
    /// stream): the request counts as unanswered, holding back the connection's later
    /// answers, until [`AnswerOrder::release`].
    pub(super) fn answer_held(&mut self, order: Order, answer: A) -> Turn<A> {
        self.record(order, answer, true)
    }

    /// Counts a held request answered at last; `true` when the caller is to write what
    /// became writable ([`AnswerOrder::next_to_write`] until it returns `None`).
    pub(super) fn release(&mut self, order: Order) -> bool {
        let Some(entry) = self.connections.get_mut(&order.peer) else {
            return false;
        };
        entry.unanswered.remove(&order.seq);
        if entry.writing || !entry.has_writable() {
            if entry.idle() {
                self.connections.remove(&order.peer);
            }
            return false;
        }
        entry.writing = true;
        true
    }

    fn record(&mut self, order: Order, answer: A, held: bool) -> Turn<A> {
        let Order { peer, seq, .. } = order;
        let Some(entry) = self.connections.get_mut(&peer) else {
            return Turn::Unordered(answer);
        };
        if !held {
            entry.unanswered.remove(&seq);
        }
        let behind = entry.unanswered.first().is_some_and(|first| *first < seq);
        if !behind && !entry.writing && entry.ready.is_empty() {
            // This thread writes it; answers that come meanwhile wait in `ready` instead of
            // blocking more threads in tiny_http behind this write (a client that reads
            // slowly could otherwise hold every worker).
            entry.writing = true;
            return Turn::Write(answer);
        }
        entry.ready.insert(seq, answer);
        if entry.writing || !entry.has_writable() {
            // A writer is at work, or an earlier answer is still to come: whoever answers
            // that one starts the writer.
            return Turn::Wait;
        }
        entry.writing = true;
        Turn::StartWriter
    }

    /// For `peer`'s writer: the next answer to write, or `None` when the next one must wait
    /// (then the writer stops, and a connection with nothing left is forgotten).
    pub(super) fn next_to_write(&mut self, peer: SocketAddr) -> Option<A> {
        let entry = self.connections.get_mut(&peer)?;
        let next = entry.take_writable();
        if next.is_none() {
            entry.writing = false;
            if entry.idle() {
                self.connections.remove(&peer);
            }
        }
        next
    }
}

/// An answer as it is written: the request, what is left of its body unread, the response.
pub(super) struct Answer {
    pub(super) rq: tiny_http::Request,
    /// The declared length of a body that was never read.
    pub(super) unread: Option<usize>,
    pub(super) response: api::Response,
    /// The local port the connection came in on (a streamed answer looks its socket up).
    pub(super) port: u16,
    /// For a streamed answer: its request's place, given back when the stream ends.
    pub(super) held: Option<Release>,
}

/// A streamed answer's place among its connection's requests, counted answered when this
/// is dropped (after the stream's end), which writes what waited behind it.
pub(super) struct Release {
    shared: Arc<Shared>,
    order: Order,
}

impl Drop for Release {
    fn drop(&mut self) {
        let write = lock(&self.shared.order).release(self.order);
        if write {
            // Behind a closed connection: each write fails at once.
            write_in_order(&self.shared, self.order.peer);
        }
    }
}

/// Answers one request exactly once, in its connection's order; dropped unanswered, it
/// answers 500 (rather than tiny_http's bare one).
pub(super) struct Responder {
    pub(super) rq: Option<tiny_http::Request>,
    /// The declared length of a body that was never read.
    pub(super) unread: Option<usize>,
    /// The request's place among its connection's requests.
    pub(super) order: Option<(Arc<Shared>, Order)>,
    /// The local port the connection came in on.
    pub(super) port: u16,
}

impl Responder {
    /// Answers with `response`.
    pub(super) fn send(mut self, response: api::Response) {
        self.answer(response);
    }

    /// Writes the answer now, then any of the connection's answers that became writable
    /// meanwhile, unless an earlier request on the same connection is still unanswered or
    /// being written: then it waits in order for whichever thread writes that one, since
    /// tiny_http would block this thread until the earlier answer is out.
    fn answer(&mut self, response: api::Response) {
        let Some(rq) = self.rq.take() else { return };
        let streamed = response.stream.is_some();
        let mut answer = Answer {
            rq,
            unread: self.unread,
            response,
            port: self.port,
            held: None,
        };
        let Some((shared, order)) = self.order.take() else {
            return write_response(answer);
        };
        let turn = if streamed {
            answer.held = Some(Release {
                shared: shared.clone(),
                order,
            });
            lock(&shared.order).answer_held(order, answer)
        } else {
            lock(&shared.order).answer(order, answer)
        };
        match turn {
            Turn::Unordered(answer) => write_response(answer),
            Turn::Write(answer) => {
                write_response(answer);
                write_in_order(&shared, order.peer);
            }
            Turn::Wait => {}
            Turn::StartWriter => {
                let writer_shared = shared.clone();
                let spawned = spawn_small("http-ordered", move || {
                    write_in_order(&writer_shared, order.peer);
                });
                if let Err(e) = spawned {
                    crate::log::error(&format!(
                        "cannot spawn an ordered writer, writing here: {e}"
                    ));
                    write_in_order(&shared, order.peer);
                }
            }
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.rq.is_some() {
            self.answer(api::Failure::NotAnswered.render(api::Api::Streams));
        }
    }
}

/// Writes a connection's held answers in order until the next one must wait.
fn write_in_order(shared: &Shared, peer: SocketAddr) {
    loop {
        let next = lock(&shared.order).next_to_write(peer);
        match next {
            Some(answer) => write_response(answer),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "127.0.0.1:5000";

    fn peer() -> SocketAddr {
        PEER.parse().unwrap()
    }

    /// `n` requests numbered on one connection.
    fn numbered(book: &mut AnswerOrder<&'static str>, n: usize) -> Vec<Order> {
        (0..n).map(|_| book.number(peer())).collect()
    }

    /// What the connection's writer writes, in order, until it must stop.
    fn written(book: &mut AnswerOrder<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| book.next_to_write(peer())).collect()
    }

    #[test]
    fn requests_are_numbered_in_order_per_connection() {
        let mut book = AnswerOrder::<&str>::default();
        let other: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        let seqs: Vec<u64> = numbered(&mut book, 3).iter().map(|o| o.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!(
            book.number(other).seq,
            0,
            "each connection counts on its own"
        );
    }

    #[test]
    fn answers_in_order_are_written_at_once() {
        let mut book = AnswerOrder::default();
        let orders = numbered(&mut book, 3);
        for (order, answer) in orders.into_iter().zip(["a", "b", "c"]) {
            assert_eq!(book.answer(order, answer), Turn::Write(answer));
            assert!(written(&mut book).is_empty(), "nothing else is held");
        }
    }

    #[test]
    fn an_answer_behind_an_unanswered_one_waits() {
        let mut book = AnswerOrder::default();
        let orders = numbered(&mut book, 2);
        assert_eq!(book.answer(orders[1], "second"), Turn::Wait);
        assert!(written(&mut book).is_empty());
    }

    #[test]
    fn answering_the_earlier_one_makes_the_later_writable() {
        let mut book = AnswerOrder::default();
        let orders = numbered(&mut book, 3);
        assert_eq!(book.answer(orders[2], "third"), Turn::Wait);
        assert_eq!(book.answer(orders[1], "second"), Turn::Wait);
        // The earliest comes last: it joins the held ones, and a writer takes all three.
        assert_eq!(book.answer(orders[0], "first"), Turn::StartWriter);
        assert_eq!(written(&mut book), ["first", "second", "third"]);
    }

    #[test]
    fn a_writer_stops_at_an_unanswered_request() {
        let mut book = AnswerOrder::default();
        let orders = numbered(&mut book, 3);
        assert_eq!(book.answer(orders[1], "second"), Turn::Wait);
        // `first` has no held predecessor but `second` is held: it is not written at once,
        // and a writer is started for both.
        assert_eq!(book.answer(orders[0], "first"), Turn::StartWriter);
        // The third is still unanswered: the writer stops before it.
        assert_eq!(written(&mut book), ["first", "second"]);
        assert_eq!(book.answer(orders[2], "third"), Turn::Write("third"));
    }

    #[test]
    fn only_one_thread_writes_a_connection_at_a_time() {
        let mut book = AnswerOrder::default();
        let orders = numbered(&mut book, 3);
        assert_eq!(book.answer(orders[0], "first"), Turn::Write("first"));
        // While `first` is being written, later answers wait for its writer, even though
        // nothing before them is unanswered.
        assert_eq!(book.answer(orders[1], "second"), Turn::Wait);
        assert_eq!(book.answer(orders[2], "third"), Turn::Wait);
        assert_eq!(written(&mut book), ["second", "third"]);
    }

    #[test]
    fn a_connection_with_nothing_outstanding_is_forgotten() {
        let mut book = AnswerOrder::default();
        let orders = numbered(&mut book, 2);
        assert_eq!(book.answer(orders[0], "first"), Turn::Write("first"));
        assert!(written(&mut book).is_empty());
        assert!(book.connections.contains_key(&peer()), "one is unanswered");
        assert_eq!(book.answer(orders[1], "second"), Turn::Write("second"));
        assert!(written(&mut book).is_empty());
        assert!(book.connections.is_empty());
        // An answer for a connection no longer tracked is written, unordered.
        assert_eq!(book.answer(orders[1], "late"), Turn::Unordered("late"));
        // The connection's numbering starts over.
        assert_eq!(book.number(peer()).seq, 0);
    }

    #[test]
    fn answers_behind_a_held_one_wait_for_its_release() {
        let mut book = AnswerOrder::default();
        let orders = numbered(&mut book, 3);
        assert_eq!(book.answer_held(orders[0], "stream"), Turn::Write("stream"));
        assert!(written(&mut book).is_empty());
        assert_eq!(
            book.answer(orders[1], "second"),
            Turn::Wait,
            "behind the stream"
        );
        assert!(written(&mut book).is_empty(), "still behind the stream");
        assert!(
            book.release(orders[0]),
            "the stream ended: write what waited"
        );
        assert_eq!(written(&mut book), ["second"]);
        // A held answer behind an unanswered one waits, and is then written first.
        let mut book = AnswerOrder::default();
        let orders = numbered(&mut book, 3);
        assert_eq!(book.answer_held(orders[1], "stream"), Turn::Wait);
        assert_eq!(book.answer(orders[2], "third"), Turn::Wait);
        assert_eq!(book.answer(orders[0], "first"), Turn::StartWriter);
        assert_eq!(written(&mut book), ["first", "stream"]);
        assert!(book.release(orders[1]));
        assert_eq!(written(&mut book), ["third"]);
        assert!(book.connections.is_empty());
    }

    #[test]
    fn a_connection_is_flooding_beyond_the_pipelining_cap() {
        let mut book = AnswerOrder::<&str>::default();
        let orders = numbered(&mut book, MAX_PIPELINED + 1);
        assert!(orders[..MAX_PIPELINED].iter().all(|o| !o.flooding));
        assert!(orders[MAX_PIPELINED].flooding);
    }
}
