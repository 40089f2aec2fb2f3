//! The committed event: one entry of a stream's append-only log, as both APIs see it.

use uuid::Uuid;

/// An event as stored: its place in the stream, its identity and its JSON data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the stream, gapless from 1.
    pub seq: u64,
    /// Commit time in epoch milliseconds; never decreases along a stream.
    pub ts: u64,
    /// The id clients see and acknowledge.
    pub id: Uuid,
    /// The streams-API event name; `None` for events published through `/publish`.
    pub name: Option<Box<str>>,
    /// JSON: the streams-API element for named events, the published `data` otherwise.
    pub data: Box<str>,
}

/// Writes `s` as a JSON string literal into `out`.
pub fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping is the reference; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).expect("a str always serializes"));
}

/// Where a reader starts in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// After the newest event: only events committed from now on.
    Now,
    /// golongpoll's `since_time` (epoch ms) and optional `last_id`: events newer than `ms`,
    /// plus those at exactly `ms` that came after `last_id` (all of them when `last_id` is
    /// not among them).
    Since {
        /// `since_time`.
        ms: u64,
        /// `last_id`.
        last_id: Option<Uuid>,
    },
    /// After a known sequence number.
    After(u64),
}

/// Deepest nesting accepted in a posted body. Stored events are wrapped in up to four more
/// levels when served, and every JSON reader (serde_json's included) stops at 128.
pub const MAX_DEPTH: usize = 100;

/// Checks that already well-formed JSON is JSON every reader can read back: nested at most
/// [`MAX_DEPTH`] deep, and no lone UTF-16 surrogates in `\u` escapes (which serde_json and
/// others refuse to decode). One pass over the bytes; `Err` says what is wrong.
pub fn check_json(body: &[u8]) -> Result<(), String> {
    let mut depth = 0usize;
    let mut i = 0;
    let mut in_string = false;
    // A high surrogate seen just before, which the next escape must complete.
    let mut pending_high = false;
    while i < body.len() {
        let b = body[i];
        i += 1;
        if in_string {
            match b {
                b'\\' if body.get(i) == Some(&b'u') => {
                    let unit = body
                        .get(i + 1..i + 5)
                        .and_then(|hex| std::str::from_utf8(hex).ok())
                        .and_then(|hex| u16::from_str_radix(hex, 16).ok())
                        .ok_or("a \\u escape needs four hex digits")?;
                    i += 5;
                    let low = (0xDC00..=0xDFFF).contains(&unit);
                    if pending_high != low {
                        return Err("a UTF-16 surrogate escape is unpaired".into());
                    }
                    pending_high = (0xD800..=0xDBFF).contains(&unit);
                    continue;
                }
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            if pending_high {
                return Err("a UTF-16 surrogate escape is unpaired".into());
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("JSON is nested deeper than {MAX_DEPTH} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_and_surrogates_are_checked() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(check_json(deep(MAX_DEPTH).as_bytes()).is_ok());
        assert!(check_json(deep(MAX_DEPTH + 1).as_bytes()).is_err());
        assert!(
            check_json(br#"{"a":"[[[[\"]]]"}"#).is_ok(),
            "brackets in strings do not count"
        );
        assert!(check_json(br#""\ud800""#).is_err(), "a lone surrogate");
        assert!(check_json(br#""\ud83d\ude00""#).is_ok(), "a surrogate pair");
        assert!(check_json(br#""\udc00""#).is_err(), "a lone low surrogate");
        assert!(
            check_json(br#""\ud800x""#).is_err(),
            "a high surrogate before text"
        );
        assert!(
            check_json(br#"["\u00e9\n\"\\"]"#).is_ok(),
            "ordinary escapes"
        );
    }
}
