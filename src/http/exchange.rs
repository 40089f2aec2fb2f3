//! Decoding tiny_http requests into [`api::Request`]s and writing [`api::Response`]s back.
//!
//! Decoding never blocks a dispatch thread on a client: a body tiny_http has not already
//! buffered (it buffers up to 1 KiB before handing a request over) is read on a
//! short-lived thread of its own, and a body declared over the limit is never read. Early
//! refusals (too many connections, too many pipelined requests) are marked on the request
//! in [`dispatch`], which the API answers at once.
//!
//! Writing never drains a large unread body on the writing thread. tiny_http 0.12 drains
//! what is left of a body when the request is dropped, also after `respond`, with one
//! allocation of the whole declared length: `Content-Length: 100000000000` would abort the
//! process (`bad_input::bodies_over_the_limit_and_lying_lengths`,
//! `streams::huge_declared_body_gets_413_while_others_are_served`). So moderate leftovers
//! are drained on a bounded set of drain threads, and larger ones are answered through
//! `upgrade`, which hands the connection over undrained, and the connection is abandoned.
//! In `upgrade` mode tiny_http writes neither the body nor its length, so [`abandon`]
//! writes both (`abuse::a_request_framed_two_ways_smuggles_nothing` reads such an answer).
//!
//! tiny_http also refuses to send a `Connection` header given to it, chunks any body over
//! 32 KiB unless told otherwise, and copies every header into allocations of its own;
//! [`tiny_response`] says how it gets round all three.

use std::io::{Cursor, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::order::{Answer, Order, Release, Responder};
use super::prober::PROBE_PATH;
use super::{Shared, spawn_small};
use crate::api::{self, Body, Method};

/// Bodies up to this size are already in memory when tiny_http hands the request over.
const BUFFERED_BODY: usize = 1024;
/// Largest unread remainder we let tiny_http drain (it allocates it in one piece).
const DRAIN_CAP: usize = 16 << 20;
/// Drains running at once; beyond it connections are abandoned instead.
const MAX_DRAINS: usize = 16;
/// The request headers the APIs look at: credentials, client ids, CORS's, the marks of a
/// browser script's request, and the client's address as a proxy forwards it.
const API_HEADERS: &[&str] = &[
    "Authorization",
    "X-Producer-ID",
    "X-Consumer-ID",
    "Origin",
    "Access-Control-Request-Method",
    "Sec-Fetch-Mode",
    "X-Requested-With",
    "X-Forwarded-For",
    "Accept",
    "Last-Event-ID",
];

static DRAINS: AtomicUsize = AtomicUsize::new(0);
static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// The value of `rq`'s first header called `name`.
fn header_value<'a>(rq: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    rq.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Decodes the request line and headers, then gets the body without ever blocking this
/// thread on the client.
pub(super) fn dispatch(shared: &Arc<Shared>, rq: tiny_http::Request, order: Option<Order>) {
    let declared = rq.body_length();
    let chunked = header_value(&rq, "Transfer-Encoding").is_some();
    let expects = header_value(&rq, "Expect").is_some();
    let order = order.map(|o| (shared.clone(), o));
    // The prober's request, exactly as it sends it; anything else on that path (a body
    // above all, which tiny_http would drain after the answer) is an ordinary request.
    let bodiless = declared.unwrap_or(0) == 0 && !chunked && !expects;
    if rq.url() == PROBE_PATH && *rq.method() == tiny_http::Method::Get && bodiless {
        shared.probes_answered.fetch_add(1, Ordering::SeqCst);
        let responder = Responder {
            rq: Some(rq),
            unread: None,
            order,
            port: shared.self_addr.port(),
        };
        return responder.send(api::Response::json(204, api::JSON_UTF8, &b""[..]));
    }
    shared.arrivals.fetch_add(1, Ordering::Relaxed);
    // Two framings for one body (differing Content-Lengths, or Content-Length with
    // Transfer-Encoding) are how requests get smuggled past proxies: refuse, unread.
    let mut lengths = rq
        .headers()
        .iter()
        .filter(|h| h.field.equiv("Content-Length"))
        .map(|h| h.value.as_str().trim());
    let first_length = lengths.next();
    let ambiguous = lengths.any(|l| Some(l) != first_length) || (chunked && first_length.is_some());
    let (path, query) = match rq.url().split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (rq.url().to_owned(), String::new()),
    };
    let method = match rq.method() {
        tiny_http::Method::Get => Method::Get,
        tiny_http::Method::Post => Method::Post,
        tiny_http::Method::Head => Method::Head,
        other => Method::Other(other.as_str().to_owned()),
    };
    // Only the headers the APIs read are copied; the rest stay with tiny_http.
    let headers = rq
        .headers()
        .iter()
        .filter(|h| API_HEADERS.iter().any(|name| h.field.equiv(name)))
        .map(|h| {
            (
                h.field.as_str().as_str().to_owned(),
                h.value.as_str().to_owned(),
            )
        })
        .collect();
    let mut req = api::Request {
        method,
        path,
        query,
        headers,
        body: Body::Bytes(Vec::new()),
        remote: rq.remote_addr().copied(),
        refused: None,
    };
    let flooding = order.as_ref().is_some_and(|(_, o)| o.flooding);
    // Until the body is read, answering must not leave it to tiny_http to drain: every
    // early answer below inherits this.
    let unread = if chunked || expects {
        declared.or(Some(usize::MAX))
    } else {
        declared.filter(|n| *n > BUFFERED_BODY)
    };
    let mut responder = Responder {
        rq: Some(rq),
        unread,
        order,
        port: shared.self_addr.port(),
    };
    let capped = !shared.uncapped.contains(&req.path.as_str());
    if capped && shared.connections.load(Ordering::Relaxed) > shared.max_connections {
        // Refused quickly rather than left to pile up toward the descriptor limit.
        req.refused = Some(api::Failure::TooManyConnections);
        return hand_to_api(shared, req, responder);
    }
    if flooding {
        // One connection may not fill the workers' queue for everyone else.
        req.refused = Some(api::Failure::TooManyPipelined);
        return hand_to_api(shared, req, responder);
    }
    if ambiguous {
        // No length can be trusted, so the rest of the stream cannot be read as requests:
        // the connection is given up after the answer.
        responder.unread = Some(usize::MAX);
        req.body = Body::Unreadable;
        return hand_to_api(shared, req, responder);
    }
    if let Some(n) = declared.filter(|n| *n > shared.max_body) {
        responder.unread = Some(n);
        req.body = Body::TooLarge;
        return hand_to_api(shared, req, responder);
    }
    let buffered = !chunked && !expects && declared.unwrap_or(0) <= BUFFERED_BODY;
    if buffered {
        return read_body_then_hand_on(shared, req, responder);
    }
    let inner = shared.clone();
    let spawned = spawn_small("http-body", move || {
        read_body_then_hand_on(&inner, req, responder);
    });
    if let Err(e) = spawned {
        crate::log::error(&format!("cannot spawn a body reader: {e}"));
    }
}

/// Reads the body (up to the limit) and hands the request on to the API.
fn read_body_then_hand_on(shared: &Arc<Shared>, mut req: api::Request, mut responder: Responder) {
    let rq = responder
        .rq
        .as_mut()
        .expect("a fresh responder holds its request");
    let limit = shared.max_body as u64 + 1;
    let mut body = Vec::new();
    let declared = rq.body_length();
    // What is left unread if reading stops early: unknown for a chunked body.
    let rest = |read: usize| Some(declared.map_or(usize::MAX, |n| n.saturating_sub(read)));
    (req.body, responder.unread) = match rq.as_reader().take(limit).read_to_end(&mut body) {
        Ok(_) if body.len() > shared.max_body => (Body::TooLarge, rest(body.len())),
        // A body that ends before its declared length is a broken request, not a short one.
        Ok(_) if declared.is_some_and(|n| body.len() < n) => (Body::Unreadable, None),
        Ok(_) => (Body::Bytes(body), None),
        Err(_) => (Body::Unreadable, rest(body.len())),
    };
    hand_to_api(shared, req, responder);
}

/// Hands a decoded request on to the server's front door, with its responder as the reply.
fn hand_to_api(shared: &Shared, req: api::Request, responder: Responder) {
    let reply = api::Reply::new(move |response| responder.send(response));
    shared.front.take(req, reply);
}

/// The tiny_http response for `response`; with `close`, one that tells the client the
/// connection ends after it.
///
/// Our headers travel as the value of one tiny_http header, `Server`, each after a line
/// break: tiny_http 0.12 copies each header's name and value into two allocations of their
/// own, and a long-poll answer has seven (`exchange::tests::our_headers_are_written_as_one`).
/// tiny_http writes the value as it is, and looks at no header of ours but `Server` (which
/// it would otherwise add itself) and `Connection` (which it refuses to send): packed in
/// the value, `Connection: close` reaches the client too.
fn tiny_response(response: &api::Response, close: bool) -> tiny_http::Response<Cursor<Arc<[u8]>>> {
    let mut value = String::with_capacity(256);
    value.push_str("eventserver");
    if close {
        // A client about to send a large body should learn that it can stop.
        value.push_str("\r\nConnection: close");
    }
    for (name, text) in &response.headers {
        // A value that would break the line or is not ASCII becomes a harmless marker.
        let printable = text
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        let (name, text) = match printable {
            true => (*name, &**text),
            false => ("X-Invalid-Header", "1"),
        };
        for part in ["\r\n", name, ": ", text] {
            value.push_str(part);
        }
    }
    let server = tiny_http::Header::from_bytes("Server", value).expect("printable ASCII");
    let len = response.body.len();
    // The length is always known: send it rather than tiny_http's default of chunking
    // anything over 32 KiB.
    tiny_http::Response::new(
        tiny_http::StatusCode(response.status),
        vec![server],
        Cursor::new(response.body.clone()),
        Some(len),
        None,
    )
    .with_chunked_threshold(usize::MAX)
}

/// Writes an answer without ever draining a large unread body on this thread.
pub(super) fn write_response(answer: Answer) {
    let Answer {
        rq,
        unread,
        mut response,
        port,
        held,
    } = answer;
    if let Some(handover) = response.stream.take() {
        return stream(rq, unread, port, &response, &handover, held);
    }
    let Some(remaining) = unread else {
        let _ = rq.respond(tiny_response(&response, false));
        return;
    };
    if remaining <= DRAIN_CAP && DRAINS.fetch_add(1, Ordering::SeqCst) < MAX_DRAINS {
        let tiny = tiny_response(&response, true);
        let spawned = spawn_small("http-drain", move || {
            // `respond` writes the answer, then tiny_http drains the rest of the body.
            let _ = rq.respond(tiny);
            DRAINS.fetch_sub(1, Ordering::SeqCst);
        });
        match spawned {
            Ok(_) => return,
            Err(e) => {
                DRAINS.fetch_sub(1, Ordering::SeqCst);
                crate::log::error(&format!("cannot spawn a drain thread: {e}"));
                // The request went into the failed closure and was dropped with it; tiny_http
                // drained it on this thread. Nothing is left to answer.
                return;
            }
        }
    }
    if remaining <= DRAIN_CAP {
        DRAINS.fetch_sub(1, Ordering::SeqCst);
    }
    abandon(rq, &response);
}

/// Writes the head of a streamed answer through tiny_http's raw writer (`into_writer`)
/// and hands the connection over, made non-blocking so that a client that stops reading
/// can never hold a thread.
///
/// What tiny_http 0.12 does with the connection then (its `client.rs` and `request.rs`):
/// by the time a request is handed over, its body (none, or up to 1 KiB, buffered; a
/// stream with a body left unread is refused here) no longer needs the socket, so the
/// reading half is already back with the connection's thread, which reads for a next
/// request. A request that said `Connection: close` ends the thread at once. Otherwise the
/// thread is usually blocked in that read already, which the switch to non-blocking does
/// not wake: it stays, as it would for a parked long-poll, until the client sends more, or
/// the read timeout passes and its answer (a 408) waits for the stream to end and finds
/// the connection shut. Either way the stream costs no thread beyond tiny_http's own for
/// the connection, and the descriptors are tiny_http's writing one (held in the
/// [`StreamPipe`]) and our duplicate.
///
/// A request pipelined behind a stream on the same connection is read by that thread, and
/// its answer waits in tiny_http for the stream to end, holding the worker that writes it:
/// no client does this (a stream is the connection's last answer), and it costs the client
/// its own stream's lifetime at most.
///
/// The descriptor is found through the kernel's socket tables (`sys::connection_socket`),
/// since tiny_http hands out none: without a /proc the stream is refused with 503 rather
/// than written with blocking writes. `sse::a_reader_that_stops_reading_is_cut_and_others_still_get_their_events`
/// shows a stalled reader never delaying the others.
fn stream(
    rq: tiny_http::Request,
    unread: Option<usize>,
    port: u16,
    head: &api::Response,
    handover: &api::Handover,
    held: Option<Release>,
) {
    let socket = rq
        .remote_addr()
        .and_then(|peer| crate::sys::connection_socket(port, *peer))
        .filter(|socket| socket.set_nonblocking(true).is_ok());
    let (Some(socket), None) = (socket, unread) else {
        handover.give(None);
        let refusal = api::Response::json(503, "text/plain", &b"cannot stream here"[..]);
        return write_response(Answer {
            rq,
            unread,
            response: refusal,
            port,
            held: None,
        });
    };
    // Written by hand: `upgrade` would add `Connection: upgrade` and `Upgrade`, which nginx
    // refuses on a 200 to an HTTP/2 client. No length and no chunking: the body is
    // everything until the connection closes.
    let mut text = format!("HTTP/1.1 {} OK\r\nServer: eventserver\r\n", head.status);
    for (name, value) in &head.headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("Connection: close\r\n\r\n");
    let mut raw = rq.into_writer();
    if raw
        .write_all(text.as_bytes())
        .and_then(|()| raw.flush())
        .is_err()
    {
        return handover.give(None);
    }
    handover.give(Some(Box::new(StreamPipe {
        socket,
        _raw: raw,
        _held: held,
    })));
}

/// A connection handed over for a stream: our non-blocking duplicate of its socket, and
/// tiny_http's writing side of it, held because dropping it would shut the socket's
/// writing half down.
struct StreamPipe {
    socket: socket2::Socket,
    _raw: Box<dyn Write + Send>,
    /// Dropped after `_raw` (fields drop in order): what waited behind the stream on its
    /// connection is written once tiny_http's writer is free.
    _held: Option<Release>,
}

impl api::Pipe for StreamPipe {
    fn try_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.socket.send(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        }
    }
}

impl Drop for StreamPipe {
    fn drop(&mut self) {
        // Ends the connection for the client and for tiny_http's thread, which reads it
        // once `_raw` is dropped after this.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// Answers through `upgrade`, which hands us the connection instead of draining it, then
/// keeps the connection forever: dropping it would make tiny_http allocate the declared
/// length in one piece, or read what follows a request framed two ways as requests. Costs
/// one parked tiny_http thread and two descriptors.
fn abandon(rq: tiny_http::Request, response: &api::Response) {
    // In upgrade mode tiny_http writes neither the body nor its length, so both are ours;
    // the extra header lines travel inside the `Upgrade` value.
    let framing = format!(
        "none\r\nContent-Length: {}\r\nConnection: close",
        response.body.len()
    );
    let head = api::Response {
        body: Arc::from(&b""[..]),
        ..response.clone()
    };
    let mut stream = rq.upgrade(&framing, tiny_response(&head, false));
    let _ = stream.write_all(&response.body);
    let _ = stream.flush();
    std::mem::forget(stream);
    let total = ABANDONED.fetch_add(1, Ordering::Relaxed) + 1;
    crate::log::warn(&format!(
        "abandoned a connection rather than read the rest of it (a body too large to drain, \
         or framed two ways; {total} so far)"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_headers_are_written_as_one() {
        let response = api::Response::json(200, "application/json", &b"{}"[..])
            .with_header("Expires", "0")
            .with_header("X-Echoed", "a\r\nInjected: 1");
        let tiny = tiny_response(&response, true);
        assert_eq!(tiny.headers().len(), 1, "one header for tiny_http to copy");
        let mut out = Vec::new();
        let http11 = tiny_http::HTTPVersion(1, 1);
        tiny.raw_print(&mut out, http11, &[], false, None)
            .expect("writes to memory");
        let text = String::from_utf8(out).expect("ASCII");
        let ours = "\r\nServer: eventserver\r\nConnection: close\r\nContent-Type: application/json\
                    \r\nExpires: 0\r\nX-Invalid-Header: 1\r\n";
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains(ours), "{text}");
        assert!(!text.contains("Injected"), "{text}");
        assert!(text.ends_with("\r\nContent-Length: 2\r\n\r\n{}"), "{text}");
    }
}
