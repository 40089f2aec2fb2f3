//! Counters and histograms for `GET /metrics`, in the Prometheus text format.
//!
//! Everything here is cheap to record (a short lock or an atomic add) and rendered only
//! when scraped. Label values are escaped per the exposition format.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Seconds buckets for request durations and commit latency.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for the number of jobs in one commit.
const BATCH: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct State {
    requests: HashMap<(&'static str, u16), u64>,
    durations: HashMap<&'static str, Histogram>,
    appended: HashMap<String, u64>,
    batch: Option<Histogram>,
    commit: Option<Histogram>,
    /// The write-ahead log's bytes and those not yet checkpointed.
    wal: (u64, u64),
}

/// The server's metrics.
#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

/// Values read from elsewhere at scrape time.
pub struct Gauges {
    /// Long-polls parked now.
    pub parked: usize,
    /// Size of the database file and its write-ahead log, in bytes.
    pub database_bytes: u64,
    /// (stream, consumer, event name, events not yet acknowledged).
    pub lag: Vec<(String, String, String, u64)>,
    /// (stream, consumer, events interest retention kept for it at its last run).
    pub held: Vec<(String, String, u64)>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock::lock(&self.state)
    }

    /// Records one answered request.
    pub fn request(&self, route: &'static str, status: u16, took: Duration) {
        let mut s = self.lock();
        *s.requests.entry((route, status)).or_default() += 1;
        s.durations
            .entry(route)
            .or_insert_with(|| Histogram::new(SECONDS))
            .observe(took.as_secs_f64());
    }

    /// Records one commit of `jobs` jobs that took `took`, appending `events` per stream.
    pub fn commit<'a>(
        &self,
        jobs: usize,
        took: Duration,
        events: impl Iterator<Item = (&'a str, usize)>,
    ) {
        let mut s = self.lock();
        s.batch
            .get_or_insert_with(|| Histogram::new(BATCH))
            .observe(jobs as f64);
        s.commit
            .get_or_insert_with(|| Histogram::new(SECONDS))
            .observe(took.as_secs_f64());
        for (stream, n) in events {
            match s.appended.get_mut(stream) {
                Some(count) => *count += n as u64,
                None => {
                    s.appended.insert(stream.to_owned(), n as u64);
                }
            }
        }
    }

    /// Records the write-ahead log as the checkpoint thread's last pass left it: its bytes,
    /// and those not yet copied into the database file.
    pub fn wal(&self, bytes: u64, pending: u64) {
        self.lock().wal = (bytes, pending);
    }

    /// Renders everything in the Prometheus text format.
    pub fn render(&self, gauges: &Gauges) -> String {
        let s = self.lock();
        let mut out = String::new();
        out.push_str(
            "# HELP eventserver_http_requests_total HTTP requests answered, by route and status.\n",
        );
        out.push_str("# TYPE eventserver_http_requests_total counter\n");
        let mut requests: Vec<_> = s.requests.iter().collect();
        requests.sort();
        for ((route, status), n) in requests {
            let _ = writeln!(
                out,
                "eventserver_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP eventserver_http_request_duration_seconds Time from request to answer.\n",
        );
        out.push_str("# TYPE eventserver_http_request_duration_seconds histogram\n");
        let mut durations: Vec<_> = s.durations.iter().collect();
        durations.sort_by_key(|(route, _)| **route);
        for (route, h) in durations {
            h.render(
                &mut out,
                "eventserver_http_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        out.push_str("# HELP eventserver_events_appended_total Events committed, by stream.\n");
        out.push_str("# TYPE eventserver_events_appended_total counter\n");
        let mut appended: Vec<_> = s.appended.iter().collect();
        appended.sort();
        for (stream, n) in appended {
            let _ = writeln!(
                out,
                "eventserver_events_appended_total{{stream=\"{}\"}} {n}",
                escape(stream)
            );
        }
        out.push_str("# HELP eventserver_writer_batch_size Jobs committed per transaction.\n");
        out.push_str("# TYPE eventserver_writer_batch_size histogram\n");
        s.batch
            .clone()
            .unwrap_or_else(|| Histogram::new(BATCH))
            .render(&mut out, "eventserver_writer_batch_size", "");
        out.push_str(
            "# HELP eventserver_writer_commit_seconds Time to apply and commit one transaction.\n",
        );
        out.push_str("# TYPE eventserver_writer_commit_seconds histogram\n");
        s.commit
            .clone()
            .unwrap_or_else(|| Histogram::new(SECONDS))
            .render(&mut out, "eventserver_writer_commit_seconds", "");
        out.push_str("# HELP eventserver_wal_bytes Size of the write-ahead log's frames at the last checkpoint; it stays near 16 MiB unless a long-held read keeps it from starting over.\n");
        out.push_str("# TYPE eventserver_wal_bytes gauge\n");
        let _ = writeln!(out, "eventserver_wal_bytes {}", s.wal.0);
        out.push_str("# HELP eventserver_wal_pending_bytes Frames of the write-ahead log not yet copied into the database file at the last checkpoint.\n");
        out.push_str("# TYPE eventserver_wal_pending_bytes gauge\n");
        let _ = writeln!(out, "eventserver_wal_pending_bytes {}", s.wal.1);
        drop(s);
        out.push_str("# HELP eventserver_longpoll_parked Long-poll requests parked now.\n");
        out.push_str("# TYPE eventserver_longpoll_parked gauge\n");
        let _ = writeln!(out, "eventserver_longpoll_parked {}", gauges.parked);
        out.push_str("# HELP eventserver_database_bytes Size of the database file and its write-ahead log.\n");
        out.push_str("# TYPE eventserver_database_bytes gauge\n");
        let _ = writeln!(out, "eventserver_database_bytes {}", gauges.database_bytes);
        out.push_str("# HELP eventserver_consumer_lag Events not yet acknowledged, by stream, consumer and event name.\n");
        out.push_str("# TYPE eventserver_consumer_lag gauge\n");
        for (stream, consumer, name, lag) in &gauges.lag {
            let _ = writeln!(
                out,
                "eventserver_consumer_lag{{stream=\"{}\",consumer=\"{}\",event_name=\"{}\"}} {lag}",
                escape(stream),
                escape(consumer),
                escape(name)
            );
        }
        out.push_str("# HELP eventserver_retention_held_events Events past the retention limits kept at its last run because this consumer has not acknowledged them (--retain-acked-only).\n");
        out.push_str("# TYPE eventserver_retention_held_events gauge\n");
        for (stream, consumer, events) in &gauges.held {
            let _ = writeln!(
                out,
                "eventserver_retention_held_events{{stream=\"{}\",consumer=\"{}\"}} {events}",
                escape(stream),
                escape(consumer)
            );
        }
        out
    }
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_buckets() {
        let m = Metrics::default();
        m.request("publish", 200, Duration::from_millis(2));
        m.request("publish", 200, Duration::from_millis(30));
        m.commit(3, Duration::from_millis(1), [("a\"b", 3)].into_iter());
        m.wal(8192, 4096);
        let text = m.render(&Gauges {
            parked: 7,
            database_bytes: 4096,
            lag: vec![("s".into(), "c".into(), "E".into(), 5)],
            held: vec![("s".into(), "gone".into(), 9)],
        });
        assert!(
            text.contains("eventserver_http_requests_total{route=\"publish\",status=\"200\"} 2\n")
        );
        assert!(text.contains(
            "eventserver_http_request_duration_seconds_bucket{route=\"publish\",le=\"0.0025\"} 1\n"
        ));
        assert!(text.contains(
            "eventserver_http_request_duration_seconds_bucket{route=\"publish\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("eventserver_events_appended_total{stream=\"a\\\"b\"} 3\n"));
        assert!(text.contains("eventserver_writer_batch_size_bucket{le=\"4\"} 1\n"));
        assert!(text.contains("eventserver_longpoll_parked 7\n"));
        assert!(text.contains("eventserver_wal_bytes 8192\n"));
        assert!(text.contains("eventserver_wal_pending_bytes 4096\n"));
        assert!(text.contains(
            "eventserver_consumer_lag{stream=\"s\",consumer=\"c\",event_name=\"E\"} 5\n"
        ));
        assert!(
            text.contains("eventserver_retention_held_events{stream=\"s\",consumer=\"gone\"} 9\n")
        );
    }
}
