//! HTTP/1.1 on the wire, as the bench needs it: writing requests into a buffer, parsing
//! responses (`Content-Length` or chunked) out of one, and a small blocking keep-alive
//! client for setup work and paced publishers.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest response head accepted before the connection is called broken.
const MAX_HEAD: usize = 64 << 10;
/// Largest response body accepted (long-poll answers hold at most a few hundred events).
const MAX_BODY: usize = 64 << 20;

/// What every request to the target carries: its `Host` and `Authorization` lines.
#[derive(Clone, Debug)]
pub struct Site {
    /// The target's address.
    pub addr: SocketAddr,
    /// `Host: …\r\nAuthorization: Basic …\r\n`, ready to paste into a request head.
    pub common: String,
}

impl Site {
    /// Headers for `addr` with Basic credentials.
    pub fn new(addr: SocketAddr, user: &str, password: &str) -> Site {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Site {
            addr,
            common: format!("Host: {addr}\r\nAuthorization: Basic {token}\r\n"),
        }
    }

    /// Appends a GET request to `out`. `extra` is zero or more complete header lines.
    pub fn get(&self, out: &mut Vec<u8>, target: &str, extra: &str) {
        // Writing into a Vec cannot fail.
        let _ = write!(out, "GET {target} HTTP/1.1\r\n{}{extra}\r\n", self.common);
    }

    /// Appends a POST request with `body` to `out`.
    pub fn post(&self, out: &mut Vec<u8>, target: &str, extra: &str, ctype: &str, body: &[u8]) {
        let _ = write!(
            out,
            "POST {target} HTTP/1.1\r\n{}{extra}Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            self.common,
            body.len()
        );
        out.extend_from_slice(body);
    }
}

/// Where a parsed body lies: inside the input buffer, or decoded from chunks.
#[derive(Debug)]
pub enum BodyAt {
    /// `buf[start..end]`.
    Range(usize, usize),
    /// A chunked body, reassembled.
    Decoded(Vec<u8>),
}

/// One complete response at the front of a buffer.
#[derive(Debug)]
pub struct Parsed {
    /// Bytes of the buffer it occupies.
    pub consumed: usize,
    /// Status code.
    pub status: u16,
    /// The server will close the connection after it.
    pub close: bool,
    /// The body.
    pub body: BodyAt,
}

impl Parsed {
    /// The body's bytes, given the buffer that was parsed.
    pub fn body<'a>(&'a self, buf: &'a [u8]) -> &'a [u8] {
        match &self.body {
            BodyAt::Range(a, b) => &buf[*a..*b],
            BodyAt::Decoded(v) => v,
        }
    }
}

/// Outcome of looking for a response at the front of a buffer.
#[derive(Debug)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete,
    /// A whole response.
    Done(Parsed),
    /// Not HTTP we understand; the connection is unusable.
    Bad(String),
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Parses the response at the front of `buf`.
pub fn parse_response(buf: &[u8]) -> Parse {
    let Some(head_end) = find(buf, b"\r\n\r\n", 0) else {
        return if buf.len() > MAX_HEAD {
            Parse::Bad("response head too large".into())
        } else {
            Parse::Incomplete
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return Parse::Bad("response head is not UTF-8".into());
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    let Some(status) = parts.next().and_then(|s| s.parse::<u16>().ok()) else {
        return Parse::Bad(format!("bad status line {status_line:?}"));
    };
    let mut close = version == "HTTP/1.0";
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if n <= MAX_BODY => length = Some(n),
                _ => return Parse::Bad(format!("bad Content-Length {value:?}")),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    let start = head_end + 4;
    if chunked {
        return parse_chunked(buf, start, status, close);
    }
    let length = match length {
        Some(n) => n,
        None if status == 204 || status == 304 || status < 200 => 0,
        None => return Parse::Bad("response without length (read-to-close unsupported)".into()),
    };
    if buf.len() < start + length {
        return Parse::Incomplete;
    }
    Parse::Done(Parsed {
        consumed: start + length,
        status,
        close,
        body: BodyAt::Range(start, start + length),
    })
}

fn parse_chunked(buf: &[u8], mut pos: usize, status: u16, close: bool) -> Parse {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(buf, b"\r\n", pos) else {
            return Parse::Incomplete;
        };
        let line = String::from_utf8_lossy(&buf[pos..line_end]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return Parse::Bad(format!("bad chunk size {size_text:?}"));
        };
        pos = line_end + 2;
        if size == 0 {
            // Trailers (usually none) end with an empty line.
            let Some(end) = find(buf, b"\r\n", pos) else {
                return Parse::Incomplete;
            };
            if end == pos {
                return Parse::Done(Parsed {
                    consumed: end + 2,
                    status,
                    close,
                    body: BodyAt::Decoded(body),
                });
            }
            let Some(end) = find(buf, b"\r\n\r\n", pos) else {
                return Parse::Incomplete;
            };
            return Parse::Done(Parsed {
                consumed: end + 4,
                status,
                close,
                body: BodyAt::Decoded(body),
            });
        }
        if body.len() + size > MAX_BODY {
            return Parse::Bad("chunked body too large".into());
        }
        if buf.len() < pos + size + 2 {
            return Parse::Incomplete;
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

/// A blocking keep-alive connection, for setup and for publishers that keep their own pace.
pub struct Blocking {
    site: Site,
    stream: Option<TcpStream>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
}

impl Blocking {
    /// A client for `site`; it connects on first use and again after a failure.
    pub fn new(site: &Site) -> Blocking {
        Blocking {
            site: site.clone(),
            stream: None,
            inbuf: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Sends the request `build` writes and returns the status and body. Any transport
    /// failure drops the connection (the next call reconnects) and is returned as an error.
    pub fn call(&mut self, build: impl FnOnce(&Site, &mut Vec<u8>)) -> io::Result<(u16, Vec<u8>)> {
        self.out.clear();
        build(&self.site, &mut self.out);
        let result = self.exchange();
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn exchange(&mut self) -> io::Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.site.addr, Duration::from_secs(10))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.set_write_timeout(Some(Duration::from_secs(60)))?;
            self.stream = Some(s);
            self.inbuf.clear();
        }
        let stream = self.stream.as_mut().expect("connected just above");
        stream.write_all(&self.out)?;
        let mut chunk = [0u8; 16 << 10];
        loop {
            match parse_response(&self.inbuf) {
                Parse::Done(p) => {
                    let body = p.body(&self.inbuf).to_vec();
                    self.inbuf.drain(..p.consumed);
                    if p.close {
                        self.stream = None;
                    }
                    return Ok((p.status, body));
                }
                Parse::Bad(why) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
                Parse::Incomplete => {}
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
            self.inbuf.extend_from_slice(&chunk[..n]);
        }
    }
}
