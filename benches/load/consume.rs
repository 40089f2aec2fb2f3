//! The **consume** scenario: a stream of 100,000 events (loaded first through the streams
//! API), then one and eight consumers each paging through all of it with GET + cumulative
//! ACK of the page's last event. Each consumer must see every event exactly once, and all
//! consumers the same order.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use crate::engine::{self, Client, Ctl, Options};
use crate::publish::Appender;
use crate::report::{self, Latency, cell_ms};
use crate::target::{Need, Target};
use crate::wire::Site;
use crate::{Api, Opts};

#[derive(Deserialize)]
struct Element {
    #[serde(rename = "eventId")]
    event_id: String,
    payload: Payload,
}

#[derive(Deserialize)]
struct Payload {
    n: u64,
}

#[derive(Default)]
struct Reader {
    ack: Option<String>,
    done: bool,
    count: u64,
    seen: HashSet<u64>,
    dups: u64,
    /// Payload numbers in arrival order.
    order: Vec<u64>,
    retry_at: Option<Instant>,
}

/// Consumers paging through one stream, one per connection.
pub struct Consumers {
    site: Site,
    get: String,
    ack_prefix: String,
    ids: Vec<String>,
    readers: Vec<Reader>,
    total: Option<u64>,
    follow_until: Option<Instant>,
    waiting: Vec<usize>,
    began: Option<Instant>,
    last: Option<Instant>,
    get_lat: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    lost: u64,
    bad: u64,
}

impl Consumers {
    /// `k` consumers (ids `consumer-<tag>-<i>`) reading `stream` in pages of `limit`, each
    /// until it has read `total` events, or, following a stream still being written, until
    /// `follow_until` (an empty page or a missing stream then means "try again shortly").
    pub fn new(
        site: &Site,
        stream: &str,
        tag: &str,
        k: usize,
        limit: usize,
        total: Option<u64>,
        follow_until: Option<Instant>,
    ) -> Consumers {
        Consumers {
            site: site.clone(),
            get: format!("/api/v1/streams/{stream}/events?eventName=E&limit={limit}"),
            ack_prefix: format!("/api/v1/streams/{stream}/events/"),
            ids: (0..k)
                .map(|i| format!("X-Consumer-ID: consumer-{tag}-{i}\r\n"))
                .collect(),
            readers: (0..k).map(|_| Reader::default()).collect(),
            total,
            follow_until,
            waiting: Vec::new(),
            began: None,
            last: None,
            get_lat: Vec::new(),
            statuses: BTreeMap::new(),
            lost: 0,
            bad: 0,
        }
    }

    /// Events read, all consumers together.
    pub fn read(&self) -> u64 {
        self.readers.iter().map(|r| r.count).sum()
    }

    /// Duplicates seen, all consumers together.
    pub fn duplicates(&self) -> u64 {
        self.readers.iter().map(|r| r.dups).sum()
    }

    /// Whether all consumers saw the same events in the same order (as far as each got:
    /// every list is a prefix of the longest), and that order matches `reference` if given.
    pub fn same_order(&self, reference: Option<&[u64]>) -> bool {
        let longest = self
            .readers
            .iter()
            .map(|r| r.order.as_slice())
            .max_by_key(|o| o.len())
            .unwrap_or_default();
        let longest = reference.unwrap_or(longest);
        self.readers.iter().all(|r| longest.starts_with(&r.order))
    }

    /// The first consumer's order.
    pub fn order(&self) -> Vec<u64> {
        self.readers
            .first()
            .map(|r| r.order.clone())
            .unwrap_or_default()
    }

    /// Non-200 answers (other than a followed stream's 404), lost requests, bad pages.
    pub fn errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.lost + self.bad
    }

    /// Seconds from the first request to the last response.
    pub fn seconds(&self) -> f64 {
        match (self.began, self.last) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Latency of the GETs, µs (taken out).
    pub fn take_get_latency(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.get_lat)
    }

    fn later(&mut self, conn: usize, now: Instant) {
        self.readers[conn].retry_at = Some(now + Duration::from_millis(20));
    }
}

impl Client for Consumers {
    fn start(&mut self, now: Instant) {
        self.began = Some(now);
    }

    fn request(&mut self, conn: usize, out: &mut Vec<u8>, now: Instant) -> bool {
        let r = &mut self.readers[conn];
        if self.follow_until.is_some_and(|t| now >= t) {
            r.done = true;
        }
        if r.done {
            return false;
        }
        if r.retry_at.is_some_and(|t| t > now) {
            self.waiting.push(conn);
            return false;
        }
        r.retry_at = None;
        match &r.ack {
            Some(id) => self.site.post(
                out,
                &format!("{}{id}", self.ack_prefix),
                &self.ids[conn],
                "application/x-www-form-urlencoded",
                b"action=ACK",
            ),
            None => self.site.get(out, &self.get, &self.ids[conn]),
        }
        true
    }

    fn response(&mut self, conn: usize, status: u16, body: &[u8], sent: Instant, now: Instant) {
        self.last = Some(now);
        let following = self.follow_until.is_some();
        let r = &mut self.readers[conn];
        if status == 404 && following && r.ack.is_none() {
            return self.later(conn, now);
        }
        if status != 200 {
            *self.statuses.entry(status).or_default() += 1;
            if self.statuses.values().sum::<u64>() > 1000 {
                r.done = true;
            }
            return self.later(conn, now);
        }
        if r.ack.take().is_some() {
            r.done = self.total.is_some_and(|t| r.count >= t);
            return;
        }
        self.get_lat
            .push(now.duration_since(sent).as_micros() as u64);
        let Ok(page) = serde_json::from_slice::<Vec<Element>>(body) else {
            self.bad += 1;
            r.done = true;
            return;
        };
        if page.is_empty() {
            if following {
                return self.later(conn, now);
            }
            // Everything was read yet the count is short: the consumer is stuck.
            r.done = true;
            return;
        }
        for e in &page {
            r.count += 1;
            if !r.seen.insert(e.payload.n) {
                r.dups += 1;
            }
            r.order.push(e.payload.n);
        }
        r.ack = page.last().map(|e| e.event_id.clone());
    }

    fn failed(&mut self, _conn: usize, now: Instant) {
        self.last = Some(now);
        self.lost += 1;
    }

    fn tick(&mut self, now: Instant, ctl: &mut Ctl) {
        if self.readers.iter().all(|r| r.done) && ctl.in_flight == 0 {
            return ctl.stop();
        }
        if self.follow_until.is_some_and(|t| now >= t) {
            for r in &mut self.readers {
                r.done = true;
            }
        }
        let readers = &self.readers;
        self.waiting.retain(|&conn| {
            if readers[conn].done || readers[conn].retry_at.is_none_or(|t| t <= now) {
                ctl.wake(conn);
                false
            } else {
                true
            }
        });
    }
}

/// Runs the consume scenario.
pub fn run(opts: &Opts) -> Result<(), String> {
    let target = Target::start(&opts.source, Need::Any)?;
    crate::prime(&target)?;
    let n = opts.consume_events;
    let stream = format!("consume-{}", opts.run_id);
    let load_conns = 64;
    let mut loader = Appender::new(
        &target.site,
        Api::Streams,
        std::slice::from_ref(&stream),
        load_conns,
        None,
        Some(n),
    );
    let eo = Options::new(Instant::now() + Duration::from_secs(600));
    engine::run(&target.nodes, load_conns, &mut loader, &eo);
    if loader.ok != n {
        return Err(format!(
            "loading: only {} of {n} events were stored",
            loader.ok
        ));
    }
    eprintln!("load: consume: loaded {n} events at {:.0}/s", loader.rate());

    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let mut reference: Option<Vec<u64>> = None;
    for k in [1usize, 8] {
        let mut c = Consumers::new(
            &target.site,
            &stream,
            &k.to_string(),
            k,
            opts.limit,
            Some(n),
            None,
        );
        let mut eo = Options::new(Instant::now() + Duration::from_secs(600));
        eo.connect_all_first = true;
        let transport = engine::run(&target.nodes, k, &mut c, &eo);
        let read = c.read();
        let secs = c.seconds();
        let rate = if secs > 0.0 { read as f64 / secs } else { 0.0 };
        let complete = c
            .readers
            .iter()
            .filter(|r| r.seen.len() as u64 == n)
            .count();
        let dups = c.duplicates();
        let same_order = c.same_order(reference.as_deref());
        if reference.is_none() {
            reference = Some(c.order());
        }
        let errors = c.errors() + transport.broken;
        let lat = Latency::of(&mut c.take_get_latency());
        rows.push(vec![
            k.to_string(),
            format!("{rate:.0}"),
            format!("{:.0}", rate / k as f64),
            cell_ms(lat.p50),
            cell_ms(lat.p99),
            format!("{complete}/{k}"),
            dups.to_string(),
            same_order.to_string(),
            errors.to_string(),
        ]);
        runs.push(json!({
            "consumers": k,
            "events_per_s": rate.round(),
            "events_per_s_per_consumer": (rate / k as f64).round(),
            "events_read": read,
            "consumers_complete": complete,
            "duplicates": dups,
            "same_order": same_order,
            "errors": errors,
            "statuses": c.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "get_latency": lat.json(),
            "seconds": secs,
        }));
    }
    report::table(
        &format!(
            "consume ({} server, {n} events, limit={}, GET + ACK per page)",
            target.kind, opts.limit
        ),
        &[
            "consumers",
            "events/s",
            "per consumer",
            "GET p50 ms",
            "GET p99 ms",
            "complete",
            "dups",
            "same order",
            "errors",
        ],
        &rows,
    );
    report::json_line(json!({
        "scenario": "consume",
        "target": target.kind,
        "events": n,
        "limit": opts.limit,
        "load_events_per_s": loader.rate().round(),
        "runs": runs,
    }));
    Ok(())
}
