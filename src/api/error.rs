//! The catalogue of every failure the APIs answer, and how each API renders it.
//!
//! Handlers, the HTTP layer's refusals and the in-process calls return a [`Failure`]; its
//! status and reason are written once, here. Each API renders it in its own contract:
//!
//! - the streams API answers a JSON string, `"<Status text>"` or `"<Status text> - <why>"`
//!   (`"Bad Request - missing X-Producer-ID header"`), with `application/json;
//!   charset=utf-8`;
//! - the long-poll API answers golongpoll's `{"error": "…"}` with golongpoll's headers.
//!   Where golongpoll has an answer of its own its wording is kept: subscribe's parameter
//!   errors come with HTTP 200 (both official clients read the body, and retry on any other
//!   status), publish's body errors and a wrong method verbatim. A parked poll's own
//!   failures carry only the reason. Everything else reads as the streams API's text.
//!
//! Internal details (a database error's message) are logged where they happen, never sent.

use std::borrow::Cow;
use std::time::Duration;

use super::Response;
use crate::event::push_json_str;
use crate::store::StoreError;
use crate::store::writer::WriteError;

/// Every failure an API can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// 400: a malformed body, name, header or parameter; nothing was stored. The reason is
    /// the one golongpoll gives where it has one.
    BadRequest(Cow<'static, str>),
    /// 400: the body was cut short, badly chunked, or framed two ways at once.
    Unreadable,
    /// A subscribe parameter golongpoll refuses; it answers these with HTTP 200.
    BadSubscription(Cow<'static, str>),
    /// 401: missing or wrong credentials.
    Unauthorized,
    /// 403: the user may not do this to this stream.
    Forbidden,
    /// 404: no such route, or no such event to acknowledge.
    NotFound,
    /// 404: a consumer read a stream that does not exist.
    NoStream(String),
    /// 405: a known route, the wrong method.
    MethodNotAllowed,
    /// 413: the body is over the limit, in bytes.
    TooLarge(usize),
    /// 423: the stream belongs to another producer.
    Locked,
    /// 429: too many failed logins from this client lately; retry after this long.
    Throttled(Duration),
    /// 503: the writer's queue is full (or it has stopped).
    WriteQueueFull,
    /// 503: the workers' queue is full, or the server stopped accepting.
    ServerBusy,
    /// 503: more connections are open than `--max-connections` allows.
    TooManyConnections,
    /// 503: one connection pipelined more requests than it may have waiting.
    TooManyPipelined,
    /// 503: more health checks are waiting than may be admitted at once.
    TooManyHealthChecks,
    /// 503: the parked-poll cap is reached.
    TooManyParked,
    /// 503: commits kept landing while a poll looked for its events.
    ChangingTooFast,
    /// 503: the server is shutting down (in-process calls).
    Stopping,
    /// 503: the database cannot be reached (PostgreSQL down, or the network to it).
    DatabaseUnavailable,
    /// 500: the user table could not be read.
    CredentialsUnreadable,
    /// 500: the stream could not be read.
    StreamUnreadable,
    /// 500: the database failed while committing.
    NotStored,
    /// 500: the worker could not open its database connection.
    NoDatabase,
    /// 500: the request was dropped unanswered (a bug, or a panicking handler).
    NotAnswered,
}

/// The API a request was for, which decides how its failures read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/api/v1/…`, the health check, metrics and unknown paths: JSON strings.
    Streams,
    /// golongpoll's subscribe and publish paths: `{"error": …}`.
    LongPoll,
}

impl Failure {
    /// The HTTP status (the streams API's; golongpoll's subscribe errors answer 200).
    pub fn status(&self) -> u16 {
        use Failure::*;
        match self {
            BadRequest(_) | Unreadable | BadSubscription(_) => 400,
            Unauthorized => 401,
            Forbidden => 403,
            NotFound | NoStream(_) => 404,
            MethodNotAllowed => 405,
            TooLarge(_) => 413,
            Locked => 423,
            Throttled(_) => 429,
            WriteQueueFull | ServerBusy | TooManyConnections | TooManyPipelined
            | TooManyHealthChecks | TooManyParked | ChangingTooFast | Stopping
            | DatabaseUnavailable => 503,
            CredentialsUnreadable | StreamUnreadable | NotStored | NoDatabase | NotAnswered => 500,
        }
    }

    /// Why, after the status text; `None` where the status says it all.
    pub fn why(&self) -> Option<Cow<'static, str>> {
        use Failure::*;
        let why: Cow<'static, str> = match self {
            BadRequest(why) | BadSubscription(why) => why.clone(),
            Unreadable => "could not read the request body".into(),
            Unauthorized | Forbidden | NotFound | MethodNotAllowed => return None,
            NoStream(stream) => format!("stream {stream} does not exist").into(),
            TooLarge(limit) => format!("limit is {limit} bytes").into(),
            Locked => "Second writers not allowed".into(),
            Throttled(wait) => {
                let secs = retry_secs(*wait);
                format!("too many failed logins, retry in {secs} s").into()
            }
            WriteQueueFull => "the write queue is full".into(),
            ServerBusy => "server is busy".into(),
            TooManyConnections => "too many open connections".into(),
            TooManyPipelined => "too many pipelined requests on this connection".into(),
            TooManyHealthChecks => "too many health checks at once".into(),
            TooManyParked => "too many parked long-polls".into(),
            ChangingTooFast => "the stream is changing too fast".into(),
            Stopping => "the server is shutting down".into(),
            DatabaseUnavailable => "the database is unavailable".into(),
            CredentialsUnreadable => "could not check credentials".into(),
            StreamUnreadable => "could not read the stream".into(),
            NotStored => "could not store the event".into(),
            NoDatabase => "no database connection".into(),
            NotAnswered => "the request was not answered".into(),
        };
        Some(why)
    }

    /// `"<Status text>"` or `"<Status text> - <why>"`: the streams API's answer text.
    pub fn text(&self) -> String {
        let status = match self.status() {
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            423 => "Locked",
            429 => "Too Many Requests",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        };
        match self.why() {
            Some(why) => format!("{status} - {why}"),
            None => status.to_owned(),
        }
    }

    /// The answer in `api`'s contract.
    pub(crate) fn render(&self, api: Api) -> Response {
        let response = match api {
            Api::Streams => Response::message(self.status(), &self.text()),
            Api::LongPoll => self.longpoll(),
        };
        self.with_headers(response)
    }

    /// golongpoll's `{"error": …}` answer.
    fn longpoll(&self) -> Response {
        use Failure::*;
        let (status, message): (u16, Cow<str>) = match self {
            BadSubscription(why) => (200, why.clone()),
            BadRequest(why) => (400, why.clone()),
            Unreadable => (400, "Invalid POST body json.".into()),
            MethodNotAllowed => (405, "Invalid HTTP Method. Only POST allowed.".into()),
            TooManyParked | ChangingTooFast | StreamUnreadable => {
                (self.status(), self.why().unwrap_or_default())
            }
            _ => (self.status(), self.text().into()),
        };
        let mut body = String::from("{\"error\": ");
        push_json_str(&mut body, &message);
        body.push('}');
        super::longpoll::golongpoll_response(status, body.into_bytes())
    }

    /// 401 names the scheme to use; 429 says when to come back.
    fn with_headers(&self, response: Response) -> Response {
        match self {
            Failure::Unauthorized => {
                response.with_header("WWW-Authenticate", "Basic realm=\"eventserver\"")
            }
            Failure::Throttled(wait) => {
                response.with_header("Retry-After", retry_secs(*wait).to_string())
            }
            _ => response,
        }
    }
}

/// Whole seconds to wait, at least one.
fn retry_secs(wait: Duration) -> u64 {
    wait.as_secs().max(1)
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl std::error::Error for Failure {}

impl From<WriteError> for Failure {
    /// The answer to a write the writer refused or failed; a database failure is logged.
    fn from(e: WriteError) -> Failure {
        match e {
            WriteError::Locked => Failure::Locked,
            WriteError::NotFound => Failure::NotFound,
            WriteError::Busy => Failure::WriteQueueFull,
            WriteError::Storage(detail) => {
                Failure::from_store(&detail, "write", Failure::NotStored)
            }
        }
    }
}

impl Failure {
    /// The answer to `what`, which failed in the store with `e` (logged): 503 while the
    /// database cannot be reached, which passes by itself, else `otherwise`.
    pub(crate) fn from_store(e: &StoreError, what: &str, otherwise: Failure) -> Failure {
        crate::log::error(&format!("{what} failed: {e}"));
        match e.is_unavailable() {
            true => Failure::DatabaseUnavailable,
            false => otherwise,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(response: &Response) -> &str {
        std::str::from_utf8(&response.body).unwrap()
    }

    /// The answers clients see, in both shapes, as the README's tables give them.
    #[test]
    fn renders_each_api_contract() {
        let streams = Failure::BadRequest("missing 'event' object".into()).render(Api::Streams);
        assert_eq!(streams.status, 400);
        assert_eq!(text(&streams), "\"Bad Request - missing 'event' object\"");
        let locked = Failure::Locked.render(Api::LongPoll);
        assert_eq!(
            (locked.status, text(&locked)),
            (423, "{\"error\": \"Locked - Second writers not allowed\"}")
        );
        let params = Failure::BadSubscription("Invalid 'since_time' arg.".into());
        let params = params.render(Api::LongPoll);
        assert_eq!(
            (params.status, text(&params)),
            (200, "{\"error\": \"Invalid 'since_time' arg.\"}")
        );
        let parked = Failure::TooManyParked.render(Api::LongPoll);
        assert_eq!(text(&parked), "{\"error\": \"too many parked long-polls\"}");
        let throttled = Failure::Throttled(Duration::from_millis(200)).render(Api::Streams);
        assert!(throttled.headers.contains(&("Retry-After", "1".into())));
        assert_eq!(
            text(&throttled),
            "\"Too Many Requests - too many failed logins, retry in 1 s\""
        );
    }
}
