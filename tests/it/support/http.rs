//! HTTP/1.1 spoken byte for byte: a request builder that can be as wrong as a test needs,
//! one exchange on a fresh connection, and one response reader.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use base64::Engine;

use super::{PASSWORD, USER};

/// How long [`Req::send`] waits for an answer: longer than the longest long-poll (110 s).
const PATIENT: Duration = Duration::from_secs(130);

/// `Authorization` header value for Basic credentials.
pub fn basic(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A request being built. Target and header values are bytes, so a request can carry
/// whatever a test needs; `Content-Length` is added unless the request has one or says
/// [`Req::no_length`], and `Connection: close` unless [`Req::keep_alive`].
#[derive(Clone)]
pub struct Req {
    addr: Option<SocketAddr>,
    method: String,
    target: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    length: bool,
    close: bool,
}

impl Req {
    /// `METHOD TARGET HTTP/1.1` for the server at `addr`.
    pub fn new(addr: SocketAddr, method: &str, target: impl AsRef<[u8]>) -> Req {
        Req {
            addr: Some(addr),
            ..Req::raw(method, target)
        }
    }

    /// A request for no server in particular (`Host: eventserver`), sent with [`exchange`].
    pub fn raw(method: &str, target: impl AsRef<[u8]>) -> Req {
        Req {
            addr: None,
            method: method.into(),
            target: target.as_ref().to_vec(),
            headers: Vec::new(),
            body: Vec::new(),
            length: true,
            close: true,
        }
    }

    /// Adds a header line `name: value` (the value may be any bytes).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// Adds Basic credentials.
    pub fn auth(self, user: &str, password: &str) -> Req {
        self.header("Authorization", basic(user, password))
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = body.into();
        self
    }

    /// Sets a JSON body with its content type.
    pub fn json(self, value: &serde_json::Value) -> Req {
        self.header("Content-Type", "application/json; charset=utf-8")
            .body(serde_json::to_vec(value).unwrap())
    }

    /// Declares no `Content-Length` (the test sets its own framing headers).
    pub fn no_length(mut self) -> Req {
        self.length = false;
        self
    }

    /// Leaves out `Connection: close`, for a connection that carries more requests.
    pub fn keep_alive(mut self) -> Req {
        self.close = false;
        self
    }

    /// The raw bytes of this request.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{} ", self.method).into_bytes();
        out.extend_from_slice(&self.target);
        match self.addr {
            Some(addr) => {
                out.extend_from_slice(format!(" HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())
            }
            None => out.extend_from_slice(b" HTTP/1.1\r\nHost: eventserver\r\n"),
        }
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let declared = self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
        if self.length && !declared {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        if self.close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Sends the request to its server on a new connection and reads the answer (130 s at
    /// most), or the test fails.
    #[track_caller]
    pub fn send(&self) -> Resp {
        let addr = self
            .addr
            .expect("Req::send needs a request made with Req::new");
        send_within(addr, self, PATIENT)
    }
}

/// A response as received.
#[derive(Debug, Clone)]
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// The headers, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, unchunked.
    pub body: Vec<u8>,
}

impl Resp {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let (_, value) = self
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))?;
        Some(value)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON, or the test fails.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// What the server did with one request.
#[derive(Debug)]
pub enum Outcome {
    /// It answered.
    Answer(Resp),
    /// It closed (or reset) the connection without answering.
    Closed,
}

/// Writes `bytes` on a new connection to `addr` and reads what comes back, all within
/// `within`; with `half_close` the client then closes its sending side. The bytes are
/// written from a thread, so a server that answers before reading them all cannot deadlock
/// the test, and a failed write is no error: the server may answer and close first. `Err`
/// when neither an answer nor a close came in time, or the answer was cut short.
pub fn exchange(
    addr: SocketAddr,
    bytes: Vec<u8>,
    within: Duration,
    half_close: bool,
) -> std::io::Result<Outcome> {
    let stream = TcpStream::connect_timeout(&addr, within)?;
    stream.set_read_timeout(Some(within))?;
    stream.set_write_timeout(Some(within))?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&bytes);
        if half_close {
            let _ = writer.shutdown(Shutdown::Write);
        }
    });
    let mut reader = BufReader::new(stream);
    let outcome = match reader.fill_buf() {
        Ok([]) => Ok(Outcome::Closed),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            Ok(Outcome::Closed)
        }
        Err(e) => Err(e),
        Ok(_) => read_response(&mut reader).map(Outcome::Answer),
    };
    // Whatever the sender has not written by now, the server does not want.
    let _ = reader.get_ref().shutdown(Shutdown::Both);
    let _ = sender.join();
    outcome
}

/// Sends `req` to `addr` on a new connection and reads the answer, all within `within`;
/// a close without an answer is an error.
pub fn try_send(addr: SocketAddr, req: &Req, within: Duration) -> std::io::Result<Resp> {
    match exchange(addr, req.bytes(), within, false)? {
        Outcome::Answer(resp) => Ok(resp),
        Outcome::Closed => Err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            "closed without an answer",
        )),
    }
}

/// [`try_send`], or the test fails.
#[track_caller]
pub fn send_within(addr: SocketAddr, req: &Req, within: Duration) -> Resp {
    try_send(addr, req, within).unwrap_or_else(|e| panic!("request to {addr} failed: {e}"))
}

/// [`try_send`] within 20 s, or the test fails.
#[track_caller]
pub fn send(addr: SocketAddr, req: Req) -> Resp {
    send_within(addr, &req, Duration::from_secs(20))
}

/// A request with the test user's credentials.
pub fn authed(addr: SocketAddr, method: &str, path: &str) -> Req {
    Req::new(addr, method, path).auth(USER, PASSWORD)
}

/// One line of a response head, which must end in CRLF: anything shorter was cut.
fn head_line(reader: &mut impl BufRead, line: &mut String) -> std::io::Result<()> {
    line.clear();
    reader.read_line(line)?;
    if line.ends_with("\r\n") {
        Ok(())
    } else {
        Err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            format!("response head cut short at {line:?}"),
        ))
    }
}

/// Reads one whole response with a `Content-Length` or chunked body; a response cut short
/// anywhere is an error.
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    head_line(reader, &mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        head_line(reader, &mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (n, v) = trimmed
            .split_once(':')
            .ok_or_else(|| std::io::Error::other(format!("bad header line {line:?}")))?;
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if resp
        .header("Transfer-Encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            head_line(reader, &mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    head_line(reader, &mut line)?;
                    if line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size, 0);
            reader.read_exact(&mut resp.body[start..])?;
            head_line(reader, &mut line)?;
        }
    } else {
        let len: usize = resp
            .header("Content-Length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        resp.body.resize(len, 0);
        reader.read_exact(&mut resp.body)?;
    }
    Ok(resp)
}
