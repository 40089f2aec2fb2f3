//! Percent-decoding of paths and `application/x-www-form-urlencoded` strings.

use std::borrow::Cow;

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`) into UTF-8 text.
/// `None` for a malformed escape or bytes that are not UTF-8.
pub fn decode(raw: &str, plus_is_space: bool) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// One name or value of a form, decoded; borrowed when it has nothing to decode.
fn decode_part(raw: &str) -> Option<Cow<'_, str>> {
    match raw.contains(['%', '+']) {
        true => decode(raw, true).map(Cow::Owned),
        false => Some(Cow::Borrowed(raw)),
    }
}

/// A decoded form or query string. Names and values without escapes are borrowed from
/// the string parsed: a poll's query usually has none, so parsing it copies nothing.
#[derive(Debug, Default)]
pub struct Form<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// Whether some pair could not be decoded (and was left out).
    pub malformed: bool,
}

impl<'a> Form<'a> {
    /// Parses `a=1&b=2`; pairs that do not decode are left out and flagged.
    pub fn parse(raw: &'a str) -> Form<'a> {
        let mut form = Form::default();
        for part in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match (decode_part(k), decode_part(v)) {
                (Some(k), Some(v)) => form.pairs.push((k, v)),
                _ => form.malformed = true,
            }
        }
        form
    }

    /// The first value of `name`.
    pub fn first(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| &**v)
    }

    /// The only value of `name`: `Err` if it appears more than once.
    pub fn single(&self, name: &str) -> Result<Option<&str>, String> {
        let mut values = self.pairs.iter().filter(|(k, _)| k == name);
        let first = values.next().map(|(_, v)| &**v);
        if values.next().is_some() {
            return Err(format!("parameter '{name}' is given more than once"));
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_plus() {
        assert_eq!(decode("a%2Fb", false).as_deref(), Some("a/b"));
        assert_eq!(decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(
            decode("Bestellungen%20%C3%84", false).as_deref(),
            Some("Bestellungen Ä")
        );
        assert_eq!(decode("%zz", false), None);
        assert_eq!(decode("%4", false), None);
        assert_eq!(decode("%ff", false), None, "not UTF-8");
    }

    #[test]
    fn parses_forms() {
        let f = Form::parse("a=1&b=&c&a=2&%zz=1");
        assert_eq!(f.first("a"), Some("1"));
        assert_eq!(f.first("b"), Some(""));
        assert_eq!(f.first("c"), Some(""));
        assert!(f.single("a").is_err());
        assert_eq!(f.single("b"), Ok(Some("")));
        assert!(f.malformed);
    }
}
