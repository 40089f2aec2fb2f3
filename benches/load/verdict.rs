//! The verdict on a subscriber run: every subscriber's list of events against what was
//! published (with a 200) to its category. Delivered/expected, duplicates and out-of-order
//! must be exact; latencies are publish→delivery per subscriber and event, and
//! publish→last subscriber per event.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::engine;
use crate::report::{Latency, percent};
use crate::subscribe::{Published, Subscribers};

/// The verdict on a subscriber run.
pub struct Verdict {
    /// Figures for the table.
    pub delivered: u64,
    /// Deliveries that should have happened.
    pub expected: u64,
    /// Events a subscriber got more than once.
    pub duplicates: u64,
    /// Events that came after a later one.
    pub out_of_order: u64,
    /// Events from another category, or never acknowledged to the publisher.
    pub foreign: u64,
    /// Subscribers whose list equals their category's exactly.
    pub exact: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// Publish→delivery latency.
    pub latency: Latency,
    /// Publish→delivery for subscribers on another node than the publisher's (none with
    /// one node).
    pub other_node: Latency,
    /// Publish→last subscriber, per event that reached all its subscribers.
    pub to_all: Latency,
    /// Transport and protocol trouble: (what, count).
    pub errors: Vec<(String, u64)>,
    /// Long-polls answered with a timeout.
    pub timeouts: u64,
    /// A few of the unexpected answers, for the report.
    pub samples: Vec<String>,
    /// CPU the bench's subscriber loops used, percent of one core over the run.
    pub bench_cpu_pct: f64,
}

impl Verdict {
    /// The bench's own load and a few of the unexpected answers, as one note line.
    pub fn notes(&self) -> String {
        let mut line = format!("bench loop CPU {}% of a core", self.bench_cpu_pct);
        if !self.errors.is_empty() {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            line.push_str(&format!("; errors {}", list.join(" ")));
        }
        for sample in &self.samples {
            line.push_str(&format!("; e.g. {sample}"));
        }
        line
    }

    /// Subscriber-side errors, all kinds together.
    pub fn error_count(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }

    /// The exactness figures and latencies as JSON.
    pub fn json(&self) -> Value {
        json!({
            "subscribers": self.subscribers,
            "delivered": self.delivered,
            "expected": self.expected,
            "delivered_pct": percent(self.delivered, self.expected),
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "foreign": self.foreign,
            "exact_subscribers": self.exact,
            "latency": self.latency.json(),
            "other_node_latency": self.other_node.json(),
            "event_to_all": self.to_all.json(),
            "timeouts": self.timeouts,
            "bench_loop_cpu_pct": self.bench_cpu_pct,
            "error_samples": self.samples,
            "errors": self.errors.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// Compares what each subscriber got with what was published to its category.
pub fn judge(
    shards: &mut [(Subscribers, engine::Stats)],
    published: &Published,
    categories: usize,
) -> Verdict {
    let mut expected_by_cat: Vec<Vec<u32>> = vec![Vec::new(); categories];
    for (seq, (cat, _, ok)) in published.events.iter().enumerate() {
        if *ok {
            expected_by_cat[*cat as usize].push(seq as u32);
        }
    }
    let mut subs_by_cat = vec![0u64; categories];
    let n_events = published.events.len();
    let mut stamp = vec![usize::MAX; n_events];
    let mut v = Verdict {
        delivered: 0,
        expected: 0,
        duplicates: 0,
        out_of_order: 0,
        foreign: 0,
        exact: 0,
        subscribers: 0,
        latency: Latency::default(),
        other_node: Latency::default(),
        to_all: Latency::default(),
        errors: Vec::new(),
        timeouts: 0,
        samples: Vec::new(),
        bench_cpu_pct: 0.0,
    };
    let (mut cpu, mut wall) = (0.0, 0.0);
    let mut sub_id = 0;
    let (mut lat, mut other_node) = (Vec::new(), Vec::new());
    let mut last_arrival = vec![0u64; n_events];
    let mut statuses = BTreeMap::new();
    let (mut error_bodies, mut bad, mut lost, mut broken) = (0, 0, 0, 0);
    for (shard, stats) in shards.iter_mut() {
        for sub in &shard.subs {
            let expected = &expected_by_cat[sub.cat as usize];
            subs_by_cat[sub.cat as usize] += 1;
            v.subscribers += 1;
            v.expected += expected.len() as u64;
            let mut max_seen: Option<u32> = None;
            for &seq in &sub.got {
                let s = seq as usize;
                let belongs =
                    s < n_events && published.events[s].0 == sub.cat && published.events[s].2;
                if s < n_events && stamp[s] == sub_id {
                    v.duplicates += 1;
                    continue;
                }
                if s < n_events {
                    stamp[s] = sub_id;
                }
                if belongs {
                    v.delivered += 1;
                } else {
                    v.foreign += 1;
                }
                if max_seen.is_some_and(|m| seq < m) {
                    v.out_of_order += 1;
                }
                max_seen = max_seen.max(Some(seq));
            }
            if sub.got == *expected {
                v.exact += 1;
            }
            sub_id += 1;
        }
        lat.append(&mut shard.lat);
        other_node.append(&mut shard.other_node_lat);
        for (seq, t) in shard.last_arrival.iter().enumerate() {
            if seq < n_events {
                last_arrival[seq] = last_arrival[seq].max(*t);
            }
        }
        for (s, n) in &shard.statuses {
            *statuses.entry(*s).or_insert(0) += n;
        }
        error_bodies += shard.error_bodies;
        bad += shard.bad_bodies;
        lost += shard.lost;
        v.timeouts += shard.timeouts;
        broken += stats.broken;
        cpu += stats.cpu.as_secs_f64();
        wall += stats.wall.as_secs_f64();
        for sample in shard.samples.iter().chain(&stats.first_errors) {
            if v.samples.len() < 5 {
                v.samples.push(sample.clone());
            }
        }
    }
    // An event reached all when every subscriber of its category got it.
    let mut reach = vec![0u64; n_events];
    for (shard, _) in shards.iter() {
        for sub in &shard.subs {
            for &seq in &sub.got {
                if let Some(r) = reach.get_mut(seq as usize) {
                    *r += 1;
                }
            }
        }
    }
    let mut to_all: Vec<u64> = published
        .events
        .iter()
        .enumerate()
        .filter(|(seq, (cat, _, ok))| {
            *ok && subs_by_cat[*cat as usize] > 0 && reach[*seq] >= subs_by_cat[*cat as usize]
        })
        .map(|(seq, (_, t, _))| last_arrival[seq].saturating_sub(*t))
        .collect();
    v.bench_cpu_pct = if wall > 0.0 {
        (cpu / wall * 1000.0).round() / 10.0
    } else {
        0.0
    };
    v.latency = Latency::of(&mut lat);
    v.other_node = Latency::of(&mut other_node);
    v.to_all = Latency::of(&mut to_all);
    for (s, n) in statuses {
        v.errors.push((format!("status_{s}"), n));
    }
    for (what, n) in [
        ("error_bodies", error_bodies),
        ("bad_bodies", bad),
        ("lost_requests", lost),
        ("broken_connections", broken),
    ] {
        if n > 0 {
            v.errors.push((what.to_owned(), n));
        }
    }
    v
}
