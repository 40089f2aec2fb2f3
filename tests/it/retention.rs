//! Retention: at most N events per stream, oldest deleted first, sequence numbers kept.

use std::time::Duration;

use crate::support::{TestServer, append_ok, consume_req, event, wait_until};

/// Every `E` event of `stream` (at most 100) after consumer `c`'s offset.
fn elements(server: &TestServer, stream: &str) -> Vec<serde_json::Value> {
    let resp = consume_req(server, stream, "c", "eventName=E&limit=100").send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json().as_array().cloned().expect("an array")
}

#[test]
fn retain_events_keeps_the_newest_per_stream() {
    let mut server = TestServer::start();
    for stream in ["r1", "r2"] {
        for i in 0..10 {
            let body = serde_json::json!({"event": {"name": "E"}, "payload": i});
            append_ok(&server, stream, "p", &body);
        }
    }
    assert_eq!(elements(&server, "r1").len(), 10);
    server.restart_with(|c| c.retain_events = Some(3));
    for stream in ["r1", "r2"] {
        wait_until(Duration::from_secs(5), "retention to run", || {
            elements(&server, stream).len() == 3
        });
        let kept = elements(&server, stream);
        let seqs: Vec<u64> = kept
            .iter()
            .map(|e| e["sequence"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![8, 9, 10]);
        assert_eq!(kept[0]["payload"], 7);
    }
    append_ok(&server, "r1", "p", &event("E"));
    let last = elements(&server, "r1").last().cloned().unwrap();
    assert_eq!(
        last["sequence"], 11,
        "sequence numbers continue after retention"
    );
}
