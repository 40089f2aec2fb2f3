//! The runtime that answers requests later, apart from the routes that decide what to do:
//! it owns the writer's queue, the workers' task lane, the timer's poke and the registry of
//! parked long-polls, and answers what they hand back.
//!
//! The path of an append: a handler builds a [`Job`] whose
//! [`Done`](crate::store::writer::Done) holds the request's [`Reply`], and calls
//! `Runtime::submit`; the writer commits it and hands the outcomes, each an [`Answer`]
//! (outcome and its `Done`), to the commit hook `Runtime::committed`, which registers the
//! new events (waking parked polls) and queues the answers as [`Task`]s for the workers,
//! which deliver them: `Done` renders the response and `Reply` sends it.
//!
//! The path of a long-poll: a handler calls `Runtime::wait` with a [`Parked`] request;
//! it is answered at once from memory or the store, or parked in the registry until a
//! commit wakes it (`Runtime::answer`), its deadline passes or its client goes away
//! (`Runtime::expire`), or the server stops.
//!
//! A stream of events (`sse`) is a long-poll that stays: a commit hands it its events and
//! leaves it parked, and at its deadline the timer gives it a heartbeat and parks it again
//! (`Runtime::renew`), until its lifetime ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};

#[cfg(feature = "postgres")]
use super::catch_up::CatchUp;
use super::error::{Api, Failure};
use super::longpoll::{self, Polled};
use super::sse::{self, Messages, Sse};
use super::{JSON_UTF8, Reply, Response, Want, streams};
use crate::clock::Clock;
use crate::event::{Event, Start};
use crate::lock::lock;
use crate::longpoll::{Poll, Registry, Wait, Woken};
use crate::pool::Task;
use crate::store::Reader;
use crate::store::Retention;
use crate::store::writer::{Answer, Committed, Job, WriteError};
use crate::sys::Peers;

/// A parked long-poll: who waits, the client's address, and since when.
pub struct Parked {
    waiter: Waiter,
    /// The client's address, to release the reply early when the client goes away.
    peer: Option<SocketAddr>,
    /// When the request was taken: its connection was open before this.
    since: Instant,
}

/// Who waits for events, which decides the shape of the answer.
enum Waiter {
    /// A golongpoll subscriber of a category, over HTTP.
    LongPoll(Arc<str>, Reply),
    /// A streams-API consumer waiting with `timeout`, over HTTP.
    Consumer(Reply),
    /// An in-process subscriber of a category ([`crate::ServerHandle::subscribe`]).
    InProcess(Arc<str>, Sender<Result<Polled, Failure>>),
    /// A stream of events (Server-Sent Events), which stays parked when woken.
    Stream(Arc<Sse>),
}

/// One answer for many parked requests, rendered once in each shape a waiter needs.
#[derive(Clone, Default)]
struct Answers {
    longpoll: Option<Response>,
    consumer: Option<Response>,
    in_process: Option<Result<Polled, Failure>>,
    stream: Option<Arc<Messages>>,
}

/// The channels and state that outlive a handler: whatever answers a request after its
/// handler returned goes through here.
pub struct Runtime {
    /// Jobs for the writer thread (bounded: a full queue answers 503).
    writer: Sender<Job>,
    /// Answers for the workers to send, ahead of new requests.
    tasks: Sender<Task>,
    /// Pokes the timer thread when a new earliest deadline is parked.
    timer: Sender<()>,
    /// Parked long-polls, by category, with their deadlines.
    pub(crate) registry: Registry<Parked>,
    /// Stamps the timeout answers.
    clock: Arc<Clock>,
    /// Categories whose waiters wait behind events committed by another node, with the
    /// newest sequence number known: the catch-up thread reads them from the store. Unset
    /// with one node, whose writer registers every event in order.
    #[cfg(feature = "postgres")]
    catch_up: std::sync::OnceLock<Sender<CatchUp>>,
    /// Set once shutdown has begun.
    stopping: AtomicBool,
    /// What the last look for clients that went away found.
    last_look: Mutex<Option<Look>>,
    /// Held from registering events until the streams they wake have taken them, so that
    /// a stream takes events in the order they were registered, whichever thread registers
    /// them: the writer's commit hook, or (on a database nodes share) the catch-up thread.
    registering: Mutex<()>,
}

/// One look for clients that went away: when it began and who was connected.
struct Look {
    began: Instant,
    peers: Peers,
}

/// Waiters answered per task, so a large fan-out spreads over the workers.
const ANSWER_CHUNK: usize = 256;

/// Commit answers queued per task.
const COMMIT_CHUNK: usize = 64;

impl Runtime {
    /// A runtime over these channels.
    pub(crate) fn new(
        writer: Sender<Job>,
        tasks: Sender<Task>,
        timer: Sender<()>,
        registry: Registry<Parked>,
        clock: Arc<Clock>,
    ) -> Runtime {
        Runtime {
            writer,
            tasks,
            timer,
            registry,
            clock,
            #[cfg(feature = "postgres")]
            catch_up: std::sync::OnceLock::new(),
            stopping: AtomicBool::new(false),
            last_look: Mutex::new(None),
            registering: Mutex::new(()),
        }
    }

    /// Whether shutdown has begun.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Marks shutdown as begun: in-process publishes are refused from now on.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Hands what the catch-up thread is to do to `queue` from now on: other nodes write
    /// to the database too.
    #[cfg(feature = "postgres")]
    pub(crate) fn share(&self, queue: Sender<CatchUp>) {
        let _ = self.catch_up.set(queue);
    }

    /// Queues `due` for the catch-up thread, if there is one.
    #[cfg(feature = "postgres")]
    pub(crate) fn catch_up(&self, due: CatchUp) {
        if let Some(queue) = self.catch_up.get() {
            let _ = queue.send(due);
        }
    }

    /// Pokes the timer thread (to re-read its deadlines, or to see that it must stop).
    pub(crate) fn poke_timer(&self) {
        // Full means a poke is pending already, which is as good.
        let _ = self.timer.try_send(());
    }

    /// Queues retention for the writer; a full queue skips it (the next round catches up).
    pub(crate) fn retain(&self, limits: Retention) {
        let _ = self.writer.try_send(Job::Retain(limits));
    }

    /// Queues the writer's stop after everything queued, waiting for room.
    pub(crate) fn stop_writer(&self) {
        // A writer that is gone already has stopped; joining it returns at once.
        let _ = self.writer.send(Job::Stop);
    }

    /// Queues a writer job. One the writer cannot take (its queue is full, or it has
    /// stopped) is answered at once with [`WriteError::Busy`].
    pub(crate) fn submit(&self, job: Job) {
        let job = match self.writer.try_send(job) {
            Ok(()) => return,
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
        };
        if let Some(answer) = job.refused(WriteError::Busy) {
            answer.send();
        }
    }

    /// Parks `parked` or answers it, for a long-poll on `category`. A stream is fed what
    /// is there and parked after it.
    pub(crate) fn wait(&self, reader: &mut Reader, category: &str, want: Want, parked: Parked) {
        let Want {
            mut start,
            filter,
            limit,
            timeout,
        } = want;
        let filter = filter.as_deref();
        let deadline = Instant::now() + timeout;
        // A stream parks for every event: a limit would leave the rest of a commit behind.
        let parked_limit = match parked.stream() {
            Some(_) => usize::MAX,
            None => limit,
        };
        let wait = |reply| Wait {
            reply,
            filter: filter.map(Into::into),
            limit: parked_limit,
            deadline,
        };
        let streaming = parked.stream().cloned();
        let mut parked = parked;
        loop {
            let mut poll = self.registry.poll(category, &start, wait(parked));
            #[cfg(feature = "postgres")]
            if let Poll::Ready(ready, events) = poll {
                poll = self.up_to_head(reader, category, ready, events, limit);
            }
            // The store decides what memory cannot. New commits can race the read; each retry
            // means another commit landed, and memory answers once it holds them.
            for _ in 0..8 {
                let Poll::Unknown(parked) = poll else { break };
                poll = match reader.since(category, &start, filter, limit) {
                    Ok(view) if !view.events.is_empty() => {
                        let events = view.events.into_iter().map(Arc::new).collect();
                        Poll::Ready(parked, events)
                    }
                    Ok(view) => self.registry.park_after(category, view.hwm, wait(parked)),
                    Err(e) => {
                        let failure =
                            Failure::from_store(&e, "long-poll read", Failure::StreamUnreadable);
                        return parked.fail(&failure);
                    }
                };
            }
            match poll {
                Poll::Ready(ready, events) => {
                    if let Some(sse) = &streaming {
                        sse.queue_events(&events);
                        sse.flush();
                        if !sse.closed() {
                            start = Start::After(sse.last_seq());
                            parked = ready;
                            continue;
                        }
                        return;
                    }
                    let answers = Answers::events(std::slice::from_ref(&ready), &events);
                    ready.answer(&answers);
                }
                Poll::Parked { earliest, cursor } => {
                    if let Some(sse) = &streaming {
                        sse.seen(cursor);
                    }
                    if earliest {
                        let _ = self.timer.try_send(());
                    }
                }
                Poll::Full(parked) => parked.fail(&Failure::TooManyParked),
                Poll::Closed(parked) => self.expire(|_| vec![parked]),
                Poll::Unknown(parked) => parked.fail(&Failure::ChangingTooFast),
            }
            return;
        }
    }

    /// Memory's answer `events` for `ready`, unless another node has committed events
    /// past them that memory has not heard of yet (its notification is on the way): then
    /// the store answers, so that a poll sent after another node's 200 gets that event, as
    /// on one node. Costs a read of the stream's head, only when memory has events to
    /// answer with and the node shares its database; a failed read leaves memory's answer,
    /// which is true, if short.
    #[cfg(feature = "postgres")]
    fn up_to_head(
        &self,
        reader: &mut Reader,
        category: &str,
        ready: Parked,
        events: Vec<Arc<Event>>,
        limit: usize,
    ) -> Poll<Parked> {
        if self.catch_up.get().is_none() || events.len() >= limit {
            return Poll::Ready(ready, events);
        }
        let last = events.last().map_or(0, |e| e.seq);
        match reader.head(category) {
            Ok(head) if head > last => Poll::Unknown(ready),
            _ => Poll::Ready(ready, events),
        }
    }

    /// Releases the parked replies of clients that went away (closed, half-closed or reset
    /// their connection), answering them as if their deadline had passed: they no longer
    /// hold a place under the parked-poll cap, and answering is what makes the HTTP layer
    /// let go of the connection (its thread and descriptors).
    ///
    /// `connected` reads the peers whose connections are open both ways now, with their
    /// sockets; `None` means unknown, and releases nothing. A reply is gone when its peer is
    /// not connected, or is connected by another socket than the one the last look (begun
    /// after the reply parked) saw there: answers are ordered per peer address, so a new
    /// connection that took a reset one's port would otherwise wait behind the old poll
    /// (`longpoll::a_client_reconnecting_from_a_reset_connections_port_is_not_held_behind_its_old_poll`).
    /// A new connection that takes the port before any look saw the old one cannot be told
    /// from it: the old poll is then held until the new connection goes too, or its deadline.
    ///
    /// A reply is released only when two reads find it gone and it was parked before the
    /// first began. A poll parked while a read ran may come from a connection that read went
    /// past; and the kernel hands its socket table out a page per read, resuming each read by
    /// counting its way into a hash bucket, so a socket leaving that bucket between two reads
    /// makes the next one skip a live connection. The second read is made only when the
    /// first finds a reply gone.
    pub(crate) fn release_gone(&self, connected: &dyn Fn() -> Option<Peers>) {
        let began = Instant::now();
        let Some(first) = connected() else { return };
        let last = lock(&self.last_look).replace(Look {
            began,
            peers: first.clone(),
        });
        let gone = |parked: &Parked, now: &Peers| {
            let Some(peer) = parked.peer.filter(|_| parked.since < began) else {
                return false;
            };
            let Some(&socket) = now.get(&peer) else {
                return true;
            };
            last.as_ref().is_some_and(|last| {
                let seen = last.peers.get(&peer).copied().flatten();
                parked.since < last.began && seen.zip(socket).is_some_and(|(a, b)| a != b)
            })
        };
        if !self.registry.any(|parked| gone(parked, &first)) {
            return;
        }
        let Some(second) = connected() else { return };
        self.expire(|registry| {
            let released =
                registry.take_where(|parked| gone(parked, &first) && gone(parked, &second));
            if !released.is_empty() {
                let n = released.len();
                crate::log::debug(&format!("released {n} polls of clients that went away"));
            }
            released
        });
    }

    /// Registers `events` of `category`, adding the waiters they wake to `woken`. Events
    /// that do not follow on from memory (another node committed some between) go to
    /// the catch-up queue by their last sequence number, to be read from the store.
    fn publish(&self, category: &str, events: &[Arc<Event>], woken: &mut Vec<Woken<Parked>>) {
        match self.registry.publish(category, events, Parked::resident) {
            Some(more) => woken.extend(more),
            None => {
                let last = events.last().map_or(0, |e| e.seq);
                #[cfg(feature = "postgres")]
                if self.catch_up.get().is_some() {
                    return self.catch_up(CatchUp::Behind(category.into(), last));
                }
                crate::log::error(&format!(
                    "events of {category} up to {last} do not follow on from memory"
                ));
            }
        }
    }

    /// Registers `events` of `category` that another node committed, and answers the
    /// waiters they wake.
    #[cfg(feature = "postgres")]
    pub(crate) fn caught_up(&self, category: &str, events: &[Arc<Event>]) {
        let _registering = lock(&self.registering);
        let mut woken = Vec::new();
        self.publish(category, events, &mut woken);
        self.answer(woken);
    }

    /// Answers woken waiters, spread over workers. Streams take their events here, in
    /// the order they were registered (callers hold `registering`): the workers that
    /// write them may run in any order.
    fn answer(&self, woken: Vec<Woken<Parked>>) {
        for group in woken {
            let answers = Answers::events(&group.replies, &group.events);
            for parked in &group.replies {
                if let (Some(sse), Some(messages)) = (parked.stream(), &answers.stream) {
                    sse.queue(messages);
                }
            }
            self.spawn_answers(group.replies, answers);
        }
    }

    /// Answers `replies` with `answers` on workers, [`ANSWER_CHUNK`] replies per task.
    fn spawn_answers(&self, replies: Vec<Parked>, answers: Answers) {
        let mut replies = replies.into_iter().peekable();
        while replies.peek().is_some() {
            let chunk: Vec<Parked> = replies.by_ref().take(ANSWER_CHUNK).collect();
            let answers = answers.clone();
            self.spawn(Box::new(move || {
                for parked in chunk {
                    parked.answer(&answers);
                }
            }));
        }
    }

    /// Sends answers from a worker.
    pub(crate) fn spawn(&self, answer: Box<dyn FnOnce() + Send>) {
        if let Err(e) = self.tasks.send(Task::Answer(answer)) {
            // Workers are gone; answer here rather than drop the replies.
            if let Task::Answer(answer) = e.into_inner() {
                answer();
            }
        }
    }

    /// Answers the parked replies `take` removes from the registry (deadline passed,
    /// shutdown, client gone): the timeout body for subscribers, `[]` for streams-API
    /// consumers. The timeout's stamp is taken first: a batch committed while the replies
    /// are being removed then gets a later timestamp, so a client resuming from the stamp
    /// still receives it.
    pub(crate) fn expire(&self, take: impl FnOnce(&Registry<Parked>) -> Vec<Parked>) {
        let stamp = self.clock.answer_stamp();
        let (streams, replies): (Vec<Parked>, Vec<Parked>) = take(&self.registry)
            .into_iter()
            .partition(|parked| parked.stream().is_some());
        self.renew(streams);
        if replies.is_empty() {
            return;
        }
        let answers = Answers {
            longpoll: Some(longpoll::timeout_response(stamp)),
            consumer: Some(Response::json(200, JSON_UTF8, &b"[]"[..])),
            in_process: Some(Ok(Polled::Timeout { timestamp: stamp })),
            stream: None,
        };
        self.spawn_answers(replies, answers);
    }

    /// Streams whose deadline came (or that were taken out for their client hanging up, or
    /// for shutdown): each gets a heartbeat and is parked again from its last event, or is
    /// closed when its lifetime is over, the server stops, or it cannot be parked again.
    /// The writes are left to workers.
    fn renew(&self, streams: Vec<Parked>) {
        let mut flushes = Vec::with_capacity(streams.len());
        for parked in streams {
            let sse = parked.stream().expect("only streams are renewed").clone();
            let now = Instant::now();
            if self.stopping() || now >= sse.ends || !sse.beat() {
                sse.close();
            } else {
                self.repark(parked, &sse, (now + sse.heartbeat).min(sse.ends));
            }
            flushes.push(sse);
        }
        let mut flushes = flushes.into_iter().peekable();
        while flushes.peek().is_some() {
            let chunk: Vec<Arc<Sse>> = flushes.by_ref().take(ANSWER_CHUNK).collect();
            self.spawn(Box::new(move || chunk.iter().for_each(|sse| sse.flush())));
        }
    }

    /// Parks stream `parked` again after the last event it has, until `deadline`, feeding
    /// it from memory whatever came meanwhile. Without the store at hand, a stream that
    /// memory cannot place (it fell behind the tail) is closed: its client resumes from its
    /// last event.
    fn repark(&self, mut parked: Parked, sse: &Sse, deadline: Instant) {
        let wait = |reply| Wait {
            reply,
            filter: None,
            limit: usize::MAX,
            deadline,
        };
        loop {
            let start = Start::After(sse.last_seq());
            let poll = match self.registry.poll(&sse.category, &start, wait(parked)) {
                // Memory forgets a category only when it had no event when the stream
                // parked and got none since (a commit keeps it): the store has none either.
                Poll::Unknown(reply) if sse.last_seq() == 0 => {
                    self.registry.park_after(&sse.category, 0, wait(reply))
                }
                poll => poll,
            };
            match poll {
                Poll::Ready(ready, events) if sse.queue_events(&events) => parked = ready,
                Poll::Parked { earliest, cursor } => {
                    sse.seen(cursor);
                    if earliest {
                        self.poke_timer();
                    }
                    return;
                }
                _ => return sse.close(),
            }
        }
    }

    /// The writer's commit hook: registers the new events, then answers the writers and
    /// the long-polls the events wake. The registry learns of the events before any writer
    /// hears of the commit, so a poll sent after a 200 sees them; the writers' answers are
    /// queued before the waiters' (which may be thousands).
    pub(crate) fn committed(&self, committed: Committed) {
        let _registering = lock(&self.registering);
        let mut woken = Vec::new();
        for appended in &committed.appended {
            self.publish(&appended.stream, &appended.events, &mut woken);
        }
        let mut replies = committed.replies.into_iter().peekable();
        while replies.peek().is_some() {
            let chunk: Vec<_> = replies.by_ref().take(COMMIT_CHUNK).collect();
            self.spawn(Box::new(move || chunk.into_iter().for_each(Answer::send)));
        }
        self.answer(woken);
    }
}

impl Answers {
    /// `events` rendered in each shape one of `waiting` needs.
    fn events(waiting: &[Parked], events: &[Arc<Event>]) -> Answers {
        let mut answers = Answers::default();
        for parked in waiting {
            match &parked.waiter {
                Waiter::LongPoll(category, _) => {
                    if answers.longpoll.is_none() {
                        answers.longpoll = Some(longpoll::events_response(category, events));
                    }
                }
                Waiter::Consumer(_) => {
                    if answers.consumer.is_none() {
                        let elements = events.iter().map(|e| &*e.data);
                        answers.consumer = Some(streams::elements_response(elements));
                    }
                }
                Waiter::InProcess(category, _) => {
                    if answers.in_process.is_none() {
                        answers.in_process = Some(longpoll::polled(category, events));
                    }
                }
                Waiter::Stream(sse) => {
                    if answers.stream.is_none() {
                        answers.stream = Some(Arc::new(sse::messages(&sse.category, events)));
                    }
                }
            }
        }
        answers
    }
}

impl Parked {
    /// A request's long-poll, answered through `reply` in `api`'s shape.
    pub(crate) fn http(api: Api, category: &str, reply: Reply, peer: Option<SocketAddr>) -> Parked {
        let waiter = match api {
            Api::LongPoll => Waiter::LongPoll(category.into(), reply),
            Api::Streams => Waiter::Consumer(reply),
        };
        Parked {
            waiter,
            peer,
            since: Instant::now(),
        }
    }

    /// An in-process subscriber's long-poll on `category`, answered through `tx`.
    pub(crate) fn in_process(category: &str, tx: Sender<Result<Polled, Failure>>) -> Parked {
        let waiter = Waiter::InProcess(category.into(), tx);
        Parked {
            waiter,
            peer: None,
            since: Instant::now(),
        }
    }

    /// A stream of events on its category, from the client at `peer`.
    pub(crate) fn streaming(sse: Arc<Sse>, peer: Option<SocketAddr>) -> Parked {
        Parked {
            waiter: Waiter::Stream(sse),
            peer,
            since: Instant::now(),
        }
    }

    /// The stream this waiter is, if it is one.
    fn stream(&self) -> Option<&Arc<Sse>> {
        match &self.waiter {
            Waiter::Stream(sse) => Some(sse),
            _ => None,
        }
    }

    /// For the registry: a handle on a waiter that stays parked when woken (a stream).
    fn resident(&self) -> Option<Parked> {
        self.stream().map(|sse| Parked {
            since: self.since,
            ..Parked::streaming(sse.clone(), self.peer)
        })
    }

    /// Answers with the answer of this waiter's shape, rendered in `answers`.
    fn answer(self, answers: &Answers) {
        const RENDERED: &str = "answers are rendered for every waiter's shape";
        match self.waiter {
            Waiter::LongPoll(_, reply) => reply.send(answers.longpoll.clone().expect(RENDERED)),
            Waiter::Consumer(reply) => reply.send(answers.consumer.clone().expect(RENDERED)),
            Waiter::InProcess(_, tx) => {
                // The caller may have stopped waiting; nobody is left to answer.
                let _ = tx.send(answers.in_process.clone().expect(RENDERED));
            }
            // Queued in commit order already (`Runtime::answer`); this writes it.
            Waiter::Stream(sse) => sse.flush(),
        }
    }

    /// Answers with `failure`, in the shape of the API that parked.
    fn fail(self, failure: &Failure) {
        match self.waiter {
            Waiter::LongPoll(_, reply) => reply.send(failure.render(Api::LongPoll)),
            Waiter::Consumer(reply) => reply.send(failure.render(Api::Streams)),
            Waiter::InProcess(_, tx) => {
                let _ = tx.send(Err(failure.clone()));
            }
            // Its head is out: it can only end, and its client comes back after `retry:`.
            Waiter::Stream(sse) => {
                sse.close();
                sse.flush();
            }
        }
    }
}
