//! Retention: at most N events per stream, oldest deleted first, sequence numbers kept.

use std::time::Duration;

use crate::support::{TestServer, wait_until};

fn elements(server: &TestServer, stream: &str) -> Vec<serde_json::Value> {
    let path = format!("/api/v1/streams/{stream}/events?eventName=E&limit=100");
    let resp = server.req("GET", &path).header("X-Consumer-ID", "c").send();
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json().as_array().cloned().expect("an array")
}

#[test]
fn retain_events_keeps_the_newest_per_stream() {
    let mut server = TestServer::start();
    for stream in ["r1", "r2"] {
        for i in 0..10 {
            let resp = server
                .req("POST", &format!("/api/v1/streams/{stream}/events"))
                .header("X-Producer-ID", "p")
                .json(&serde_json::json!({"event": {"name": "E"}, "payload": i}))
                .send();
            assert_eq!(resp.status, 200, "{}", resp.text());
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
    let resp = server
        .req("POST", "/api/v1/streams/r1/events")
        .header("X-Producer-ID", "p")
        .json(&serde_json::json!({"event": {"name": "E"}}))
        .send();
    assert_eq!(resp.status, 200);
    let last = elements(&server, "r1").last().cloned().unwrap();
    assert_eq!(
        last["sequence"], 11,
        "sequence numbers continue after retention"
    );
}
