//! Admission: which queue a decoded request waits in, and the refusals decided before any
//! handler runs. Called on the HTTP layer's decoding thread, so it never blocks.
//!
//! Two lanes, writes first: publishes, appends and ACKs go ahead of reads, because every
//! parked subscriber waits on them and they are few beside the re-polls a publish sets off.
//! Health checks go with the writes, so the watchdog's check gets through a flood of
//! re-polls rather than be refused with them; they need no credentials, so only
//! [`MAX_HEALTH_CHECKS`] at a time may take that lane (and the writer).
//!
//! CORS preflights take no lane: they need neither credentials nor the database, so they
//! are answered here, at once ([`super::edge`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{App, Failure, HEALTH_PATHS, Method, Reply, Request};

/// A request admitted to a lane: the worker that takes it answers through its reply.
pub struct Incoming {
    /// The decoded request.
    pub request: Request,
    /// Its answer channel, back to the HTTP layer.
    pub reply: Reply,
}

/// The queue a request waits in for a worker; workers take every write before any read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Publishes, appends, ACKs and health checks.
    Writes = 0,
    /// Everything else.
    Reads = 1,
}

/// Health checks admitted at once; more are refused until one is answered.
pub const MAX_HEALTH_CHECKS: usize = 8;

/// One admitted health check; its place is given back when it is dropped, answered or not.
struct HealthSlot(Arc<AtomicUsize>);

impl HealthSlot {
    fn take(count: &Arc<AtomicUsize>) -> Option<HealthSlot> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_HEALTH_CHECKS).then_some(n + 1)
            })
            .ok()
            .map(|_| HealthSlot(count.clone()))
    }
}

impl Drop for HealthSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl App {
    /// The lane `request` waits in, or its refusal (the HTTP layer's, or too many health
    /// checks) or its preflight's answer, answered here at once. Every answer, now or
    /// later, gets the headers browsers need ([`super::edge`]).
    pub(crate) fn admit(&self, request: Request, reply: Reply) -> Option<(Lane, Incoming)> {
        let edge = self.edge(&request);
        let preflight = super::edge::is_preflight(&request).then(|| edge.preflight());
        let reply = edge.wrap(reply);
        let incoming = Incoming { request, reply };
        if let Some(failure) = &incoming.request.refused {
            let failure = failure.clone();
            self.refuse(incoming, &failure);
            return None;
        }
        if let Some(answer) = preflight {
            incoming.reply.send(answer);
            return None;
        }
        let req = &incoming.request;
        if HEALTH_PATHS.contains(&req.path.as_str()) {
            let Some(slot) = HealthSlot::take(&self.health_checks) else {
                self.refuse(incoming, &Failure::TooManyHealthChecks);
                return None;
            };
            let Incoming { request, reply } = incoming;
            let reply = Reply::new(move |response| {
                drop(slot);
                reply.send(response)
            });
            return Some((Lane::Writes, Incoming { request, reply }));
        }
        let write = req.method == Method::Post && req.path != self.config.events_path;
        let lane = if write { Lane::Writes } else { Lane::Reads };
        Some((lane, incoming))
    }

    /// Answers `incoming` with `failure`, in the shape of the API it was for.
    pub(crate) fn refuse(&self, incoming: Incoming, failure: &Failure) {
        let response = failure.render(self.api_of(&incoming.request.path));
        incoming.reply.send(response);
    }
}
