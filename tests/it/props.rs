//! Property tests of every parser and validator that sees client input, through
//! the public facade `eventserver::check`: no input makes one panic, and valid inputs
//! round-trip. Also runs the fuzz target's seed corpus (`tests/fuzz/corpus/request/`) once,
//! so CI exercises it on the stable toolchain without cargo-fuzz.

use std::path::PathBuf;

use eventserver::Start;
use eventserver::check::{
    Form, check_publish, check_stream_name, decode, exercise, glob_match, parse_basic, stream_name,
    subscribe_params, validate_event,
};
use proptest::prelude::*;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::support::basic;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures print their minimal input; no regression files beside the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Strategies and encoders
// ---------------------------------------------------------------------------------------

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            json_object(inner).prop_map(Value::Object),
        ]
    })
}

fn json_object(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(any::<String>(), inner, 0..6)
        .prop_map(|m| m.into_iter().collect::<Map<String, Value>>())
}

/// A name a stream may have: 1-1024 bytes of UTF-8 without control characters.
fn valid_name() -> impl Strategy<Value = String> {
    "\\P{Cc}{1,64}".prop_filter("at most 1024 bytes", |s| s.len() <= 1024)
}

fn hex(byte: u8, upper: bool) -> String {
    if upper {
        format!("%{byte:02X}")
    } else {
        format!("%{byte:02x}")
    }
}

/// Percent-encodes `s`: each character is escaped or kept as `mask` says (characters that
/// must be escaped always are). With `form`, `+`, `&` and `=` are escaped and a space may be
/// written as `+`.
fn encode(s: &str, mask: &[bool], form: bool) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        let pick = |k: usize| mask.is_empty() || mask[(2 * i + k) % mask.len()];
        let must = c == '%' || (form && matches!(c, '+' | '&' | '='));
        if form && c == ' ' && pick(0) {
            out.push('+');
        } else if must || pick(0) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&hex(b, pick(1)));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every way a client may write a UUID.
fn uuid_forms(id: Uuid) -> Vec<String> {
    let canonical = id.hyphenated().to_string();
    vec![
        canonical.clone(),
        canonical.to_uppercase(),
        id.braced().to_string(),
        id.braced().to_string().to_uppercase(),
        id.urn().to_string(),
        id.simple().to_string(),
        id.simple().to_string().to_uppercase(),
    ]
}

/// Text built from the tokens the parsers care about, so random inputs reach past the first
/// check of each.
fn token_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("\"".to_owned()),
        Just("\\".to_owned()),
        Just("\\u".to_owned()),
        Just("\\ud800".to_owned()),
        Just("\"event\"".to_owned()),
        Just("\"name\"".to_owned()),
        Just("\"version\"".to_owned()),
        Just("\"system\"".to_owned()),
        Just("\"payload\"".to_owned()),
        Just("\"category\"".to_owned()),
        Just("\"data\"".to_owned()),
        Just("null".to_owned()),
        Just("%".to_owned()),
        Just("%0".to_owned()),
        Just("%ff".to_owned()),
        Just("%C3%A4".to_owned()),
        Just("%00".to_owned()),
        Just("+".to_owned()),
        Just("&".to_owned()),
        Just("=".to_owned()),
        Just("timeout=".to_owned()),
        Just("category=".to_owned()),
        Just("since_time=".to_owned()),
        Just("last_id=".to_owned()),
        Just("eventName=".to_owned()),
        Just("Basic ".to_owned()),
        Just("dGVzdGVyOnB3".to_owned()),
        Just("=".to_owned()),
        Just("*".to_owned()),
        Just("\n".to_owned()),
        Just("-".to_owned()),
        Just("9223372036854775808".to_owned()),
        Just("1e3".to_owned()),
        "[0-9]{1,20}",
        "\\PC{0,8}",
        any::<u128>().prop_map(|u| Uuid::from_u128(u).to_string()),
    ];
    prop::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

fn start_since(ms: i64, last_id: Option<Uuid>) -> Start {
    Start::Since {
        ms: ms.max(0) as u64,
        last_id,
    }
}

// ---------------------------------------------------------------------------------------
// No input panics
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn no_bytes_make_any_parser_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        exercise(&data);
    }

    #[test]
    fn no_token_soup_makes_any_parser_panic(text in token_soup(), max in any::<u64>()) {
        exercise(text.as_bytes());
        let _ = subscribe_params(&text, max);
        let form = Form::parse(&text);
        let _ = (form.first("timeout"), form.single("category"), form.malformed);
        let _ = check_stream_name(&text);
        if let Some((pattern, name)) = text.split_once('*') {
            let _ = glob_match(&format!("*{name}"), pattern);
        }
    }

    #[test]
    fn no_unicode_text_makes_any_parser_panic(text in "\\PC{0,200}") {
        exercise(text.as_bytes());
        let _ = decode(&text, false);
        let _ = glob_match(&text, &text);
    }

    #[test]
    fn no_json_value_makes_a_validator_panic(value in json_value()) {
        let body = serde_json::to_vec(&value).unwrap();
        exercise(&body);
        let wrapped = serde_json::json!({ "event": value.clone(), "category": value });
        exercise(&serde_json::to_vec(&wrapped).unwrap());
    }
}

// ---------------------------------------------------------------------------------------
// Valid inputs round-trip
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    /// Any name without control characters, percent-encoded any way, decodes to itself.
    #[test]
    fn an_encoded_stream_name_decodes_to_itself(
        name in valid_name(),
        mask in prop::collection::vec(any::<bool>(), 0..16),
    ) {
        let encoded = encode(&name, &mask, false);
        prop_assert_eq!(stream_name(&encoded), Ok(name.clone()));
        prop_assert_eq!(check_stream_name(&name), Ok(()));
        prop_assert_eq!(decode(&encoded, false), Some(name));
    }

    /// Names are 1-1024 bytes: exactly the longer ones are refused, however encoded.
    #[test]
    fn stream_names_over_1024_bytes_are_refused(
        unit in "\\P{Cc}",
        repeat in 200usize..1100,
    ) {
        let name = unit.repeat(repeat);
        let encoded = encode(&name, &[], false);
        prop_assert_eq!(stream_name(&encoded).is_ok(), name.len() <= 1024);
    }

    /// A control character anywhere makes a name invalid.
    #[test]
    fn a_control_character_anywhere_is_refused(
        name in valid_name(),
        control in "\\p{Cc}",
        at in any::<prop::sample::Index>(),
    ) {
        let chars: Vec<char> = name.chars().collect();
        let at = at.index(chars.len() + 1);
        let mut bad: String = chars[..at].iter().collect();
        bad.push_str(&control);
        bad.extend(&chars[at..]);
        prop_assert!(check_stream_name(&bad).is_err());
        prop_assert!(stream_name(&encode(&bad, &[], false)).is_err());
    }

    /// Form-encoded pairs come back from `Form::parse`; a repeated name is not single.
    #[test]
    fn encoded_form_pairs_come_back(
        pairs in prop::collection::btree_map("\\PC{1,12}", "\\PC{0,12}", 1..6),
        mask in prop::collection::vec(any::<bool>(), 0..16),
    ) {
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k, &mask, true), encode(v, &mask, true)))
            .collect();
        let joined = query.join("&");
        let form = Form::parse(&joined);
        prop_assert!(!form.malformed);
        for (k, v) in &pairs {
            prop_assert_eq!(form.first(k), Some(v.as_str()));
            prop_assert_eq!(form.single(k), Ok(Some(v.as_str())));
        }
        let (k, v) = pairs.iter().next().unwrap();
        let doubled = format!("{}&{}={}", query.join("&"), encode(k, &[], true), encode(v, &[], true));
        prop_assert!(Form::parse(&doubled).single(k).is_err());
    }

    /// Basic credentials come back from the header, user name exactly.
    #[test]
    fn basic_credentials_come_back(user in "[^:]{1,24}", password in any::<String>()) {
        let header = basic(&user, &password);
        let creds = parse_basic(&header);
        prop_assert!(creds.is_some(), "{:?} refused", header);
        prop_assert_eq!(creds.unwrap().user, user.clone());
        let lower = header.replacen("Basic", "basic", 1);
        prop_assert_eq!(parse_basic(&lower).map(|c| c.user), Some(user.clone()));
        let spaced = format!("  {header}  ");
        prop_assert_eq!(parse_basic(&spaced).map(|c| c.user), Some(user));
    }

    /// Any valid event validates, its name comes back, and the stored members are the
    /// posted ones, verbatim and in the contract's order (event, system, trigger, payload);
    /// others are dropped.
    #[test]
    fn a_valid_event_validates_and_keeps_its_members(
        name in "\\PC{1,40}",
        version in prop::option::of(1u64..),
        extra in json_object(json_value()),
        system in prop::option::of(json_object(json_value())),
        trigger in prop::option::of(json_object(json_value())),
        payload in prop::option::of(json_value()),
        unknown in prop::option::of(json_value()),
    ) {
        let mut event = extra;
        event.insert("name".into(), Value::String(name.clone()));
        match version {
            Some(v) => { event.insert("version".into(), Value::from(v)); }
            None => { event.remove("version"); }
        }
        let mut body = Map::new();
        body.insert("event".into(), Value::Object(event));
        if let Some(system) = system { body.insert("system".into(), Value::Object(system)); }
        if let Some(trigger) = trigger { body.insert("trigger".into(), Value::Object(trigger)); }
        if let Some(payload) = payload { body.insert("payload".into(), payload); }
        if let Some(unknown) = unknown { body.insert("unknown".into(), unknown); }
        let text = serde_json::to_string(&Value::Object(body)).unwrap();
        let (got, fields) = validate_event(text.as_bytes())
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(got, name);
        // The server's view of the posted body, through the same parser.
        let posted: Map<String, Value> = serde_json::from_str(&text).unwrap();
        let stored: Map<String, Value> =
            serde_json::from_str(&format!("{{{}}}", fields.trim_start_matches(','))).unwrap();
        let kept: Map<String, Value> = posted
            .into_iter()
            .filter(|(k, _)| ["event", "system", "trigger", "payload"].contains(&k.as_str()))
            .collect();
        prop_assert_eq!(stored, kept);
        let order: Vec<&str> = ["event", "system", "trigger", "payload"]
            .into_iter()
            .filter(|m| fields.contains(&format!(",\"{m}\":")))
            .collect();
        let mut positions: Vec<usize> =
            order.iter().map(|m| fields.find(&format!(",\"{m}\":")).unwrap()).collect();
        let sorted = { let mut p = positions.clone(); p.sort(); p };
        prop_assert_eq!(&positions, &sorted);
        positions.dedup();
        prop_assert_eq!(positions.len(), order.len());
    }

    /// Breaking one rule of a valid event makes it invalid.
    #[test]
    fn an_event_breaking_a_rule_is_refused(
        name in "\\PC{1,20}",
        rule in 0usize..7,
        junk in json_value(),
    ) {
        let body = match rule {
            0 => serde_json::json!({ "event": { "name": "" } }),
            1 => serde_json::json!({ "event": { "name": name, "version": 0 } }),
            2 => serde_json::json!({ "event": { "name": name, "version": -1 } }),
            3 => serde_json::json!({ "event": { "name": name, "version": 1.5 } }),
            4 => serde_json::json!({ "event": { "name": name }, "system": null }),
            5 => serde_json::json!({ "event": { "name": name }, "trigger": [junk] }),
            _ => serde_json::json!({ "payload": junk }),
        };
        prop_assert!(validate_event(&serde_json::to_vec(&body).unwrap()).is_err(), "{}", body);
    }

    /// A valid publish body gives back its category and data.
    #[test]
    fn a_valid_publish_gives_back_category_and_data(
        category in valid_name(),
        data in json_value().prop_filter("data must be non-null", |v| !v.is_null()),
        unknown in prop::option::of(json_value()),
    ) {
        let mut body = serde_json::json!({ "category": category, "data": data });
        if let Some(unknown) = unknown {
            body["unknown"] = unknown;
        }
        let text = serde_json::to_string(&body).unwrap();
        let (got, raw) = check_publish(text.as_bytes())
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(got, category);
        let posted: Value = serde_json::from_str(&text).unwrap();
        let stored: Value = serde_json::from_str(&raw).unwrap();
        prop_assert_eq!(&stored, &posted["data"]);
    }

    /// Any UUID, in any of its forms and percent-encoded or not, is a `last_id`.
    #[test]
    fn every_uuid_form_is_a_last_id(
        id in any::<u128>(),
        since in any::<i64>(),
        category in valid_name(),
        timeout in 1u64..=110,
        mask in prop::collection::vec(any::<bool>(), 0..16),
    ) {
        let id = Uuid::from_u128(id);
        for form in uuid_forms(id) {
            let query = format!(
                "timeout={timeout}&category={}&since_time={since}&last_id={}",
                encode(&category, &mask, true),
                encode(&form, &mask, true)
            );
            let parsed = subscribe_params(&query, 110);
            prop_assert_eq!(
                parsed,
                Ok((category.clone(), timeout, start_since(since, Some(id)))),
                "{}", query
            );
        }
    }

    /// `timeout` is accepted exactly from 1 to the maximum, with golongpoll's message.
    #[test]
    fn timeout_is_checked_against_the_maximum(timeout in any::<u64>(), max in 1u64..100_000) {
        let parsed = subscribe_params(&format!("category=c&timeout={timeout}"), max);
        if (1..=max).contains(&timeout) {
            prop_assert_eq!(parsed, Ok(("c".to_owned(), timeout, Start::Now)));
        } else {
            prop_assert_eq!(
                parsed,
                Err(format!("Invalid or missing 'timeout' arg.  Must be 1-{max}."))
            );
        }
    }

    /// A name matches a pattern made from it by replacing pieces with `*`, and itself.
    #[test]
    fn a_name_matches_patterns_made_from_it(
        name in "[^*]{0,30}",
        cuts in prop::collection::vec(any::<bool>(), 0..30),
    ) {
        let chars: Vec<char> = name.chars().collect();
        let mut pattern = String::new();
        for (i, c) in chars.iter().enumerate() {
            if cuts.get(i).copied().unwrap_or(false) {
                if !pattern.ends_with('*') {
                    pattern.push('*');
                }
            } else {
                pattern.push(*c);
            }
        }
        prop_assert!(glob_match(&pattern, &name), "{:?} does not match {:?}", pattern, name);
        prop_assert!(glob_match(&name, &name));
        prop_assert!(glob_match("*", &name));
        let longer = format!("{name}x");
        prop_assert!(!glob_match(&longer, &name));
    }
}

// ---------------------------------------------------------------------------------------
// Fixed cases the properties do not reach by chance
// ---------------------------------------------------------------------------------------

#[test]
fn since_time_extremes_and_empty_values() {
    let q = |s: &str| subscribe_params(s, 110);
    assert_eq!(
        q("category=c&timeout=1&since_time=-9223372036854775808"),
        Ok(("c".into(), 1, start_since(0, None)))
    );
    assert_eq!(
        q("category=c&timeout=1&since_time=9223372036854775807"),
        Ok(("c".into(), 1, start_since(i64::MAX, None)))
    );
    for bad in ["9223372036854775808", "1e3", "1.0", "0x1", " 1", "--1"] {
        assert_eq!(
            q(&format!("category=c&timeout=1&since_time={bad}")),
            Err("Invalid 'since_time' arg.".into()),
            "{bad}"
        );
    }
    assert_eq!(
        q("category=c&timeout=1&since_time=&last_id="),
        Ok(("c".into(), 1, Start::Now))
    );
}

#[test]
fn the_seed_corpus_runs_through_every_parser() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus/request");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 12, "only {} seed files", files.len());
    for file in &files {
        let data = std::fs::read(file).unwrap();
        exercise(&data);
        // Seeds named valid-* are accepted by the validator they were written for.
        let name = file.file_name().unwrap().to_string_lossy();
        if name.starts_with("valid-event") {
            assert!(validate_event(&data).is_ok(), "{name}");
        }
        if name.starts_with("valid-publish") {
            assert!(check_publish(&data).is_ok(), "{name}");
        }
        if name.starts_with("valid-auth") {
            let text = String::from_utf8(data.clone()).unwrap();
            assert!(parse_basic(text.trim()).is_some(), "{name}");
        }
        if name.starts_with("valid-subscribe") {
            let text = String::from_utf8(data.clone()).unwrap();
            assert!(subscribe_params(text.trim(), 110).is_ok(), "{name}");
        }
    }
}
