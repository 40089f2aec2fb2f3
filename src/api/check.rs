//! Every parser and validator that sees client input, in one public place for property
//! tests and the fuzz target (`tests/fuzz`). None of them may panic, whatever the input.

pub use super::longpoll::{check_publish, subscribe_params};
pub use super::query::{Form, decode};
pub use super::streams::{check_stream_name, stream_name, validate_event};
pub use crate::auth::{glob_match, parse_basic};

/// Runs `data` through every parser, as the fuzz target and its corpus test do. The first
/// byte picks nothing: every parser sees the whole input, so one corpus serves them all.
pub fn exercise(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = decode(&text, true);
    let _ = decode(&text, false);
    let form = Form::parse(&text);
    let _ = form.single("eventName");
    let _ = stream_name(&text);
    let _ = validate_event(data);
    let _ = check_publish(data);
    let _ = subscribe_params(&text, 110);
    let _ = parse_basic(&text);
    if let Some((pattern, name)) = text.split_once('\n') {
        let _ = glob_match(pattern, name);
    }
}
