//! What the APIs do for browsers and reverse proxies, around every handler.
//!
//! - **CORS** (`--cors-origins`, off by default). A preflight (`OPTIONS` with `Origin` and
//!   `Access-Control-Request-Method`) is answered at admission, 204 without credentials,
//!   never parked and never queued behind re-polls; a listed origin's preflight is allowed
//!   the methods and request headers the APIs use. Every answer to a listed origin carries
//!   `Access-Control-Allow-Origin` (the origin itself, with credentials allowed) and
//!   exposes `Retry-After`; with `*` any origin is allowed, never with credentials. Other
//!   origins get no CORS headers, so the browser keeps its same-origin policy.
//! - **No login dialog for scripts.** A browser shows its own login prompt for a 401 that
//!   carries `WWW-Authenticate: Basic`, even to a script's fetch, XHR or EventSource; a
//!   script's request (`Sec-Fetch-Mode` other than `navigate`, or `X-Requested-With:
//!   XMLHttpRequest`) gets its 401 without the challenge, and handles it itself. Other
//!   clients (curl, the Go client, a page opened in the address bar) keep the challenge.
//! - **The client behind a trusted proxy.** From a peer in `--trusted-proxies`, the client
//!   is the right-most address in `X-Forwarded-For` that is not a trusted proxy: the
//!   addresses left of it were written by the client, who may write anything.

use std::net::{IpAddr, SocketAddr};

use super::{App, Method, Reply, Request, Response};

/// The methods the APIs answer, as a preflight allows them.
const ALLOW_METHODS: &str = "GET, POST, HEAD";
/// The request headers the APIs read, as a preflight allows them.
const ALLOW_HEADERS: &str =
    "Authorization, Content-Type, X-Producer-ID, X-Consumer-ID, Last-Event-ID";
/// The answer headers a script may read beyond the safelisted ones: when to come back after
/// a 429 or 503.
const EXPOSE_HEADERS: &str = "Retry-After";
/// How long a browser may reuse a preflight's answer, in seconds: an origin taken off
/// `--cors-origins` loses access within ten minutes of the restart.
const MAX_AGE_SECS: &str = "600";

/// Which origin an answer allows.
enum Allowed {
    /// A listed origin: named in the answer, credentials allowed.
    Listed(String),
    /// Any origin, through `*`: no credentials.
    Any,
}

/// What the answer to one request gets on its way out.
pub(super) struct Edge {
    /// Whether CORS is on: every answer then varies by `Origin`.
    cors: bool,
    /// The origin the answer allows, if any.
    allowed: Option<Allowed>,
    /// Whether a browser script sent the request: no `WWW-Authenticate`.
    script: bool,
}

impl Edge {
    /// The CORS headers of an answer, and no challenge for a script.
    fn apply(&self, mut response: Response) -> Response {
        if self.script {
            response
                .headers
                .retain(|(name, _)| !name.eq_ignore_ascii_case("WWW-Authenticate"));
        }
        if self.cors {
            // A shared cache must not hand one origin's answer to another.
            response.headers.push(("Vary", "Origin".into()));
        }
        let origin = match &self.allowed {
            None => return response,
            Some(Allowed::Any) => "*".to_owned(),
            Some(Allowed::Listed(origin)) => {
                response
                    .headers
                    .push(("Access-Control-Allow-Credentials", "true".into()));
                origin.clone()
            }
        };
        response
            .headers
            .push(("Access-Control-Allow-Origin", origin.into()));
        response
            .headers
            .push(("Access-Control-Expose-Headers", EXPOSE_HEADERS.into()));
        response
    }

    /// Wraps `reply` so that its answer gets these headers; unwrapped when there are none.
    pub(super) fn wrap(self, reply: Reply) -> Reply {
        if !self.cors && !self.script {
            return reply;
        }
        Reply::new(move |response| reply.send(self.apply(response)))
    }

    /// The answer to a preflight: 204, with what the APIs allow if the origin is allowed.
    pub(super) fn preflight(&self) -> Response {
        let response = Response {
            status: 204,
            headers: Vec::new(),
            body: Vec::new().into(),
            stream: None,
        };
        match self.allowed {
            None => response,
            Some(_) => response
                .with_header("Access-Control-Allow-Methods", ALLOW_METHODS)
                .with_header("Access-Control-Allow-Headers", ALLOW_HEADERS)
                .with_header("Access-Control-Max-Age", MAX_AGE_SECS),
        }
    }
}

/// Whether `req` is a CORS preflight, which a browser sends without credentials.
pub(super) fn is_preflight(req: &Request) -> bool {
    matches!(&req.method, Method::Other(m) if m == "OPTIONS")
        && req.header("Origin").is_some()
        && req.header("Access-Control-Request-Method").is_some()
}

/// Whether a browser script sent `req` (fetch, XHR, EventSource), not a navigation or a
/// non-browser client. Browsers mark every request with `Sec-Fetch-Mode`, `navigate` for
/// a page opened in a tab; jQuery and older code add `X-Requested-With`.
fn from_script(req: &Request) -> bool {
    let mode = req.header("Sec-Fetch-Mode");
    mode.is_some_and(|m| !m.eq_ignore_ascii_case("navigate"))
        || req
            .header("X-Requested-With")
            .is_some_and(|v| v.eq_ignore_ascii_case("XMLHttpRequest"))
}

/// The address a hop of `X-Forwarded-For` names; proxies may add a port.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

impl App {
    /// What the answer to `req` gets on its way out.
    pub(super) fn edge(&self, req: &Request) -> Edge {
        let origins = &self.config.cors_origins;
        let allowed = req.header("Origin").and_then(|origin| {
            if origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
                Some(Allowed::Listed(origin.to_owned()))
            } else {
                origins.iter().any(|o| o == "*").then_some(Allowed::Any)
            }
        });
        Edge {
            cors: !origins.is_empty(),
            allowed,
            script: from_script(req),
        }
    }

    /// The client's address: the TCP peer's, or from a trusted proxy the right-most address
    /// in `X-Forwarded-For` that is not a trusted proxy (the nearest trusted hop, where a
    /// hop is not an address).
    pub(crate) fn client(&self, req: &Request) -> Option<IpAddr> {
        let trusted = |ip: IpAddr| self.config.trusted_proxies.iter().any(|c| c.contains(ip));
        let mut client = req.remote?.ip();
        // Header lines in arrival order, each hop in order: proxies append on the right.
        let hops = req
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("X-Forwarded-For"))
            .flat_map(|(_, value)| value.split(','));
        for hop in hops.rev() {
            if !trusted(client) {
                break;
            }
            match hop_address(hop) {
                Some(ip) => client = ip,
                None => break,
            }
        }
        Some(client)
    }
}
