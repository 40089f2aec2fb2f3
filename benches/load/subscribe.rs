//! Long-poll subscribers in bulk: the [`Subscribers`] client, the paced publisher, and the
//! [`Plan`] that parks N subscribers, publishes, and waits for delivery. The scenarios built on
//! them are in `fanout.rs` (fanout, categories, idle) and `mixed.rs`.
//!
//! Every subscriber resumes the way golongpoll's clients do, with `since_time` and `last_id`
//! of the last event it got, so nothing published while it was between polls is lost. A
//! refused poll (non-200, or an `{"error": …}` body) is retried after 50-150 ms, spread so a
//! refused crowd does not come back as one. Each event's data carries its sequence number and
//! the bench-clock time it was sent, so a subscriber knows its publish→delivery latency.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::chart::Timeline;
use crate::engine::{self, Client, Ctl, Options};
use crate::target::Target;
use crate::wire::{Blocking, Site};

/// Counters shared by the main thread and the subscriber threads.
#[derive(Default)]
pub struct Shared {
    /// Subscribers that have sent their first poll.
    pub polling: AtomicUsize,
    /// Events received, all subscribers together.
    pub received: AtomicU64,
    /// Tells the subscriber threads to close everything and return.
    pub stop: AtomicBool,
}

#[derive(Deserialize)]
struct PollReply {
    #[serde(default)]
    events: Vec<PollEvent>,
    #[serde(default)]
    timeout: Option<IgnoredAny>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct PollEvent {
    timestamp: u64,
    id: String,
    data: EventData,
}

#[derive(Deserialize)]
struct EventData {
    seq: u32,
    t: u64,
}

/// One subscriber: its category, its cursor, and every event it got, in arrival order.
pub(crate) struct Sub {
    /// Index of its category.
    pub(crate) cat: u32,
    since: u64,
    last_id: Option<String>,
    started: bool,
    /// Sequence numbers of the events it got.
    pub(crate) got: Vec<u32>,
    retry_at: Option<Instant>,
}

/// One thread's share of the subscribers.
pub struct Subscribers {
    site: Site,
    categories: Arc<Vec<String>>,
    timeout_s: u64,
    epoch: Instant,
    shared: Arc<Shared>,
    /// The subscribers, one per connection.
    pub(crate) subs: Vec<Sub>,
    /// The first subscriber's number over all threads: subscriber `first + conn` polls
    /// node `(first + conn) % nodes`.
    pub(crate) first: usize,
    nodes: usize,
    waiting: Vec<usize>,
    /// Publish→delivery latency of every event received, µs.
    pub(crate) lat: Vec<u64>,
    /// The same for subscribers on a node other than the first, through which the paced
    /// publisher publishes: the cross-node wake-up.
    pub(crate) other_node_lat: Vec<u64>,
    /// The same latencies by their arrival time on the bench clock, for `--report`.
    pub(crate) timeline: Timeline,
    /// Per sequence number: when the last subscriber here got it (µs on the bench clock).
    pub(crate) last_arrival: Vec<u64>,
    /// Non-200 answers.
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// `{"error": …}` answers.
    pub(crate) error_bodies: u64,
    /// Answers that were not the JSON expected.
    pub(crate) bad_bodies: u64,
    /// Polls answered with a timeout.
    pub(crate) timeouts: u64,
    /// Polls lost to broken connections.
    pub(crate) lost: u64,
    /// A few unexpected answers.
    pub(crate) samples: Vec<String>,
}

impl Subscribers {
    /// Subscribers `numbers`; subscriber `i` follows category `i % categories` and polls
    /// node `i % nodes`.
    pub fn new(
        site: &Site,
        categories: &Arc<Vec<String>>,
        numbers: std::ops::Range<usize>,
        nodes: usize,
        timeout_s: u64,
        epoch: Instant,
        shared: &Arc<Shared>,
    ) -> Subscribers {
        Subscribers {
            site: site.clone(),
            categories: categories.clone(),
            timeout_s,
            epoch,
            shared: shared.clone(),
            first: numbers.start,
            subs: numbers
                .map(|i| Sub {
                    cat: (i % categories.len()) as u32,
                    // A fresh category: "since 1 ms after the epoch" is everything.
                    since: 1,
                    last_id: None,
                    started: false,
                    got: Vec::new(),
                    retry_at: None,
                })
                .collect(),
            nodes: nodes.max(1),
            waiting: Vec::new(),
            lat: Vec::new(),
            other_node_lat: Vec::new(),
            timeline: Timeline::default(),
            last_arrival: Vec::new(),
            statuses: BTreeMap::new(),
            error_bodies: 0,
            bad_bodies: 0,
            timeouts: 0,
            lost: 0,
            samples: Vec::new(),
        }
    }

    fn sample(&mut self, status: u16, body: &[u8]) {
        let text = format!(
            "{status} {}",
            String::from_utf8_lossy(&body[..body.len().min(120)])
        );
        if self.samples.len() < 3 && !self.samples.contains(&text) {
            self.samples.push(text);
        }
    }

    fn later(&mut self, conn: usize, now: Instant) {
        // Spread retries so a refused crowd does not come back as one.
        let ms = 50 + (conn as u64 * 7919) % 100;
        self.subs[conn].retry_at = Some(now + Duration::from_millis(ms));
    }
}

impl Client for Subscribers {
    fn request(&mut self, conn: usize, out: &mut Vec<u8>, now: Instant) -> bool {
        let sub = &mut self.subs[conn];
        if sub.retry_at.is_some_and(|t| t > now) {
            self.waiting.push(conn);
            return false;
        }
        sub.retry_at = None;
        if !sub.started {
            sub.started = true;
            self.shared.polling.fetch_add(1, Ordering::Relaxed);
        }
        let category = &self.categories[sub.cat as usize];
        let mut target = format!(
            "/events?category={category}&timeout={}&since_time={}",
            self.timeout_s, sub.since
        );
        if let Some(id) = &sub.last_id {
            target.push_str("&last_id=");
            target.push_str(id);
        }
        self.site.get(out, &target, "");
        true
    }

    fn response(&mut self, conn: usize, status: u16, body: &[u8], _sent: Instant, now: Instant) {
        if status != 200 {
            *self.statuses.entry(status).or_default() += 1;
            self.sample(status, body);
            return self.later(conn, now);
        }
        let Ok(reply) = serde_json::from_slice::<PollReply>(body) else {
            self.bad_bodies += 1;
            self.sample(status, body);
            return self.later(conn, now);
        };
        if reply.error.is_some() {
            self.error_bodies += 1;
            self.sample(status, body);
            return self.later(conn, now);
        }
        if reply.timeout.is_some() {
            self.timeouts += 1;
        }
        let now_us = now.duration_since(self.epoch).as_micros() as u64;
        let other_node = !(self.first + conn).is_multiple_of(self.nodes);
        let sub = &mut self.subs[conn];
        for e in &reply.events {
            let seq = e.data.seq as usize;
            sub.got.push(e.data.seq);
            let lat = now_us.saturating_sub(e.data.t);
            self.lat.push(lat);
            if other_node {
                self.other_node_lat.push(lat);
            }
            self.timeline.record(now_us, lat);
            if self.last_arrival.len() <= seq {
                self.last_arrival.resize(seq + 1, 0);
            }
            self.last_arrival[seq] = self.last_arrival[seq].max(now_us);
        }
        if let Some(e) = reply.events.last() {
            sub.since = e.timestamp;
            sub.last_id = Some(e.id.clone());
            self.shared
                .received
                .fetch_add(reply.events.len() as u64, Ordering::Relaxed);
        }
    }

    fn failed(&mut self, _conn: usize, _now: Instant) {
        self.lost += 1;
    }

    fn tick(&mut self, now: Instant, ctl: &mut Ctl) {
        if self.shared.stop.load(Ordering::Relaxed) {
            return ctl.stop();
        }
        let subs = &self.subs;
        self.waiting.retain(|&conn| {
            if subs[conn].retry_at.is_none_or(|t| t <= now) {
                ctl.wake(conn);
                false
            } else {
                true
            }
        });
    }
}

/// What the publisher sent.
#[derive(Default)]
pub struct Published {
    /// Per sequence number: category, send time (µs on the bench clock), and whether the
    /// server answered 200.
    pub events: Vec<(u32, u64, bool)>,
    /// Latency of the publish requests, µs.
    pub ack_lat: Vec<u64>,
    /// Non-200 answers and transport failures.
    pub errors: u64,
    /// How late the last publish started against its schedule, µs.
    pub schedule_lag: u64,
    /// A few of the failed publishes' answers.
    pub error_samples: Vec<String>,
}

impl Published {
    /// Failed publishes, for a note line (empty when none failed).
    pub fn notes(&self) -> String {
        if self.errors == 0 {
            return String::new();
        }
        format!(
            "; {} publishes failed, e.g. {}",
            self.errors,
            self.error_samples.join(" | ")
        )
    }
}

/// Publishes `count` events to categories chosen by `pick`, one every `interval`, on one
/// keep-alive connection. `seq` numbers start at 0. Publishing stops a minute past the
/// schedule even if a slow server keeps it behind; the events not sent count as errors.
pub fn publish_paced(
    site: &Site,
    categories: &[String],
    count: usize,
    interval: Duration,
    epoch: Instant,
    mut pick: impl FnMut(usize) -> u32,
) -> Published {
    let mut client = Blocking::new(site);
    let mut out = Published::default();
    let start = Instant::now();
    let deadline = start + interval * count as u32 + Duration::from_secs(60);
    for seq in 0..count {
        if Instant::now() > deadline {
            out.errors += (count - seq) as u64;
            out.error_samples.push(format!(
                "{} events not sent: a minute behind schedule",
                count - seq
            ));
            break;
        }
        let due = start + interval * seq as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let cat = pick(seq);
        let sent = Instant::now();
        out.schedule_lag = sent.saturating_duration_since(due).as_micros() as u64;
        let t = sent.duration_since(epoch).as_micros() as u64;
        let body = format!(
            r#"{{"category":{},"data":{{"seq":{seq},"t":{t}}}}}"#,
            serde_json::to_string(&categories[cat as usize]).expect("a str serializes")
        );
        let result =
            client.call(|s, o| s.post(o, "/publish", "", "application/json", body.as_bytes()));
        let ok = matches!(result, Ok((200, _)));
        if ok {
            out.ack_lat.push(sent.elapsed().as_micros() as u64);
        } else {
            out.errors += 1;
            let what = match result {
                Ok((status, body)) => format!("{status} {}", String::from_utf8_lossy(&body)),
                Err(e) => e.to_string(),
            };
            if out.error_samples.len() < 3 && !out.error_samples.contains(&what) {
                out.error_samples.push(what);
            }
        }
        out.events.push((cat, t, ok));
    }
    out
}

/// A whole subscriber run: park `n` subscribers over `categories`, wait until they are
/// parked, call `during` (which publishes and returns what it sent), wait for delivery to
/// finish, then stop. Returns the shards, what was published, and the time to park.
pub struct Plan<'a> {
    /// The server.
    pub target: &'a Target,
    /// Category names (URL-safe).
    pub categories: Arc<Vec<String>>,
    /// Subscribers.
    pub n: usize,
    /// Event-loop threads.
    pub threads: usize,
    /// Long-poll timeout in seconds.
    pub timeout_s: u64,
    /// The bench clock.
    pub epoch: Instant,
    /// After publishing, how long to wait for the last deliveries.
    pub drain: Duration,
    /// End with a reset on every connection rather than a FIN (`--close-with-reset`).
    pub reset_at_end: bool,
}

impl<'a> Plan<'a> {
    /// A plan for `n` subscribers over `categories` starting now, whose polls outlast
    /// `secs` of publishing, with 15 s for the last deliveries.
    pub fn new(
        target: &'a Target,
        categories: Arc<Vec<String>>,
        n: usize,
        opts: &crate::Opts,
        secs: f64,
    ) -> Plan<'a> {
        Plan {
            target,
            categories,
            n,
            threads: opts.threads,
            timeout_s: poll_timeout(secs),
            epoch: Instant::now(),
            drain: Duration::from_secs(15),
            reset_at_end: opts.close_with_reset,
        }
    }
}

/// The outcome of [`Plan::run`].
pub struct Outcome {
    /// Each thread's subscribers and transport figures.
    pub shards: Vec<(Subscribers, engine::Stats)>,
    /// What was published.
    pub published: Published,
    /// From the first connection until every subscriber was parked (or presumed so).
    pub park_time: Duration,
}

impl Outcome {
    /// Every thread's delivery latencies by second, taken out of the shards.
    pub fn timeline(&mut self) -> Timeline {
        let mut all = Timeline::default();
        for (shard, _) in &mut self.shards {
            all.merge(std::mem::take(&mut shard.timeline));
        }
        all
    }
}

impl Plan<'_> {
    /// Runs it; `during` gets the shared counters and returns what it published.
    pub fn run(&self, during: impl FnOnce(&Arc<Shared>) -> Published) -> Result<Outcome, String> {
        let shared = Arc::new(Shared::default());
        let threads = self.threads.min(self.n.max(1));
        let mut shards = Vec::new();
        let mut first = 0;
        for t in 0..threads {
            let count = self.n / threads + usize::from(t < self.n % threads);
            shards.push((
                Subscribers::new(
                    &self.target.site,
                    &self.categories,
                    first..first + count,
                    self.target.nodes.len(),
                    self.timeout_s,
                    self.epoch,
                    &shared,
                ),
                count,
            ));
            first += count;
        }
        let began = Instant::now();
        // Hard bound on the whole run (timed phases are at most an hour); the plan normally
        // stops long before.
        let eo = Options {
            reset_at_end: self.reset_at_end,
            ..Options::new(began + Duration::from_secs(3_900))
        };
        let nodes = &self.target.nodes;
        std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .into_iter()
                .enumerate()
                .map(|(i, (mut client, count))| {
                    let eo = eo.clone();
                    // Subscriber `first + j` polls node `(first + j) % nodes`, whichever
                    // thread it is on.
                    let mut addrs = nodes.clone();
                    addrs.rotate_left(client.first % nodes.len().max(1));
                    std::thread::Builder::new()
                        .name(format!("subs-{i}"))
                        .spawn_scoped(scope, move || {
                            let stats = engine::run(&addrs, count, &mut client, &eo);
                            (client, stats)
                        })
                        .expect("spawn a subscriber thread")
                })
                .collect();
            let result = self.orchestrate(&shared, began, during);
            shared.stop.store(true, Ordering::Relaxed);
            let shards: Vec<_> = handles
                .into_iter()
                .map(|h| h.join().expect("subscriber thread"))
                .collect();
            result.map(|(published, park_time)| Outcome {
                shards,
                published,
                park_time,
            })
        })
    }

    fn orchestrate(
        &self,
        shared: &Arc<Shared>,
        began: Instant,
        during: impl FnOnce(&Arc<Shared>) -> Published,
    ) -> Result<(Published, Duration), String> {
        let limit = began + Duration::from_secs(120);
        while shared.polling.load(Ordering::Relaxed) < self.n {
            if Instant::now() > limit {
                return Err(format!(
                    "only {} of {} subscribers got a poll out within 120 s",
                    shared.polling.load(Ordering::Relaxed),
                    self.n
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // In process the registry says when all are parked; otherwise allow the server a
        // moment per thousand subscribers to take the last requests in.
        if self.target.parked().is_some() {
            let limit = Instant::now() + Duration::from_secs(30);
            while self.target.parked().unwrap_or(0) < self.n && Instant::now() < limit {
                std::thread::sleep(Duration::from_millis(2));
            }
        } else {
            std::thread::sleep(Duration::from_millis(500 + self.n as u64 / 10));
        }
        let park_time = began.elapsed();
        let published = during(shared);
        let subs_per_cat = |cat: usize| {
            let k = self.categories.len();
            (self.n / k + usize::from(cat < self.n % k)) as u64
        };
        let expected: u64 = published
            .events
            .iter()
            .filter(|e| e.2)
            .map(|e| subs_per_cat(e.0 as usize))
            .sum();
        let limit = Instant::now() + self.drain;
        while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((published, park_time))
    }
}

/// Long-poll timeout for a run whose publishing lasts `secs`: long enough that nobody
/// times out meanwhile, within golongpoll's usual 110 s cap.
fn poll_timeout(secs: f64) -> u64 {
    (secs as u64 + 30).clamp(30, 110)
}
