//! The **publish** scenario: K keep-alive connections appending small events as fast as they
//! can, through the streams API (each connection its own stream and producer) and through
//! `/publish` (each connection its own category). Only 200s are counted, and a 200 means the
//! event is committed durably, so the figure is durable appends per second.
//!
//! The [`Appender`] client is also how other scenarios load events.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::chart::{self, Report, Timeline};
use crate::engine::{self, Client, Ctl, Options};
use crate::report::{self, Figure, Latency, cell_ms};
use crate::target::{Need, Target};
use crate::wire::Site;
use crate::{Api, Opts};

/// Appends events on every connection it is given.
pub struct Appender {
    site: Site,
    api: Api,
    /// Per connection: the request target and the producer header (streams) or the JSON
    /// category (publish).
    paths: Vec<String>,
    extras: Vec<String>,
    duration: Option<Duration>,
    deadline: Option<Instant>,
    remaining: Option<u64>,
    idle: Vec<usize>,
    next: u64,
    body: Vec<u8>,
    /// Time of the first request.
    pub began: Option<Instant>,
    /// Time of the last response.
    pub last: Option<Instant>,
    /// 200s.
    pub ok: u64,
    /// Other statuses and how often.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests lost to broken connections.
    pub lost: u64,
    /// Latency of each 200, µs.
    pub lat: Vec<u64>,
    /// The same latencies by their time since the first request, for `--report`.
    pub timeline: Timeline,
    /// Whether each 200's body looked right (an id, or `{"success": true}`).
    pub bad_bodies: u64,
}

impl Appender {
    /// `conns` connections appending to `names[i % names.len()]` for `duration` (from the
    /// first request), or until `count` events got their 200.
    pub fn new(
        site: &Site,
        api: Api,
        names: &[String],
        conns: usize,
        duration: Option<Duration>,
        count: Option<u64>,
    ) -> Appender {
        let (paths, extras) = (0..conns)
            .map(|i| {
                let name = &names[i % names.len()];
                match api {
                    Api::Streams => (
                        format!("/api/v1/streams/{name}/events"),
                        format!("X-Producer-ID: producer-{name}\r\n"),
                    ),
                    Api::Publish => (
                        "/publish".to_owned(),
                        serde_json::to_string(name).expect("a str serializes"),
                    ),
                }
            })
            .unzip();
        Appender {
            site: site.clone(),
            api,
            paths,
            extras,
            duration,
            deadline: None,
            remaining: count,
            idle: Vec::new(),
            next: 0,
            body: Vec::with_capacity(256),
            began: None,
            last: None,
            ok: 0,
            statuses: BTreeMap::new(),
            lost: 0,
            lat: Vec::new(),
            timeline: Timeline::default(),
            bad_bodies: 0,
        }
    }

    fn finished(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d) || self.remaining == Some(0)
    }

    /// Events per second over the time from the first request to the last response.
    pub fn rate(&self) -> f64 {
        match (self.began, self.last) {
            (Some(a), Some(b)) if b > a => self.ok as f64 / b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Seconds from the first request to the last response.
    pub fn elapsed(&self) -> f64 {
        match (self.began, self.last) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Non-200 answers plus lost requests.
    pub fn errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.lost
    }

    fn retry_later(&mut self) {
        if let Some(r) = &mut self.remaining {
            *r += 1;
        }
    }
}

impl Client for Appender {
    fn start(&mut self, now: Instant) {
        self.began = Some(now);
        self.deadline = self.duration.map(|d| now + d);
    }

    fn request(&mut self, conn: usize, out: &mut Vec<u8>, now: Instant) -> bool {
        if self.finished(now) {
            self.idle.push(conn);
            return false;
        }
        if let Some(r) = &mut self.remaining {
            *r -= 1;
        }
        let n = self.next;
        self.next += 1;
        self.body.clear();
        let path = &self.paths[conn];
        match self.api {
            Api::Streams => {
                use std::io::Write;
                let _ = write!(
                    self.body,
                    r#"{{"event":{{"name":"E"}},"payload":{{"n":{n}}}}}"#
                );
                self.site.post(
                    out,
                    path,
                    &self.extras[conn],
                    "application/json",
                    &self.body,
                );
            }
            Api::Publish => {
                use std::io::Write;
                let category = &self.extras[conn];
                let _ = write!(self.body, r#"{{"category":{category},"data":{{"n":{n}}}}}"#);
                self.site
                    .post(out, path, "", "application/json", &self.body);
            }
        }
        true
    }

    fn response(&mut self, _conn: usize, status: u16, body: &[u8], sent: Instant, now: Instant) {
        self.last = Some(now);
        if status == 200 {
            self.ok += 1;
            let lat = now.duration_since(sent).as_micros() as u64;
            self.lat.push(lat);
            if let Some(began) = self.began {
                self.timeline
                    .record(now.duration_since(began).as_micros() as u64, lat);
            }
            let good = match self.api {
                Api::Streams => body.len() == 38 && body[0] == b'"',
                Api::Publish => body.windows(4).any(|w| w == b"true"),
            };
            if !good {
                self.bad_bodies += 1;
            }
        } else {
            *self.statuses.entry(status).or_default() += 1;
            self.retry_later();
        }
    }

    fn failed(&mut self, _conn: usize, now: Instant) {
        self.last = Some(now);
        self.lost += 1;
        self.retry_later();
    }

    fn tick(&mut self, now: Instant, ctl: &mut Ctl) {
        if self.finished(now) {
            if ctl.in_flight == 0 {
                ctl.stop();
            }
        } else {
            for conn in self.idle.drain(..) {
                ctl.wake(conn);
            }
        }
    }
}

/// One publish run's figures.
struct Run {
    api: Api,
    conns: usize,
    app: Appender,
    transport: engine::Stats,
    writer: Option<WriterStats>,
    disk_bytes: Option<u64>,
}

/// The server's group-commit figures from `GET /metrics` (eventserver's Prometheus
/// histograms `eventserver_writer_batch_size` and `eventserver_writer_commit_seconds`),
/// added up over its nodes; absent for servers without them.
#[derive(Clone, Copy, Debug, Default)]
struct WriterStats {
    jobs: f64,
    commits: f64,
    commit_seconds: f64,
}

impl WriterStats {
    /// Every node's figures added up.
    fn scrape(target: &Target) -> Option<WriterStats> {
        target
            .node_sites()
            .iter()
            .try_fold(WriterStats::default(), |sum, site| {
                let node = WriterStats::scrape_node(site)?;
                Some(WriterStats {
                    jobs: sum.jobs + node.jobs,
                    commits: sum.commits + node.commits,
                    commit_seconds: sum.commit_seconds + node.commit_seconds,
                })
            })
    }

    fn scrape_node(site: &Site) -> Option<WriterStats> {
        let mut client = crate::wire::Blocking::new(site);
        let (status, body) = client.call(|s, o| s.get(o, "/metrics", "")).ok()?;
        if status != 200 {
            return None;
        }
        let text = String::from_utf8_lossy(&body);
        let value = |name: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        };
        Some(WriterStats {
            jobs: value("eventserver_writer_batch_size_sum")?,
            commits: value("eventserver_writer_batch_size_count")?,
            commit_seconds: value("eventserver_writer_commit_seconds_sum")?,
        })
    }

    fn since(self, before: WriterStats) -> WriterStats {
        WriterStats {
            jobs: self.jobs - before.jobs,
            commits: self.commits - before.commits,
            commit_seconds: self.commit_seconds - before.commit_seconds,
        }
    }

    fn mean_batch(&self) -> f64 {
        if self.commits > 0.0 {
            self.jobs / self.commits
        } else {
            0.0
        }
    }

    /// The writer's time to apply and commit, per job.
    fn us_per_job(&self) -> f64 {
        if self.jobs > 0.0 {
            self.commit_seconds * 1e6 / self.jobs
        } else {
            0.0
        }
    }

    fn mean_commit_ms(&self) -> f64 {
        if self.commits > 0.0 {
            self.commit_seconds * 1000.0 / self.commits
        } else {
            0.0
        }
    }
}

/// Storage bytes written so far by the server's process (this one when in process); none
/// for nodes on PostgreSQL, whose writes are PostgreSQL's.
fn disk_of(target: &Target) -> Option<u64> {
    match (target.kind.as_str(), target.pid) {
        (kind, _) if kind.starts_with("postgres") => None,
        ("in-process", _) => report::disk_write_bytes(None),
        (_, Some(pid)) => report::disk_write_bytes(Some(pid)),
        _ => None,
    }
}

/// Storage bytes per stored event over a run.
fn disk_per_event(run: &Run) -> Option<f64> {
    run.disk_bytes
        .filter(|_| run.app.ok > 0)
        .map(|b| b as f64 / run.app.ok as f64)
}

/// CPU the load generator's loop used, percent of one core over its run.
fn cpu_pct(stats: &engine::Stats) -> f64 {
    let wall = stats.wall.as_secs_f64();
    if wall > 0.0 {
        (stats.cpu.as_secs_f64() / wall * 1000.0).round() / 10.0
    } else {
        0.0
    }
}

/// Runs the publish scenario and prints its table and JSON line; its figures are events/s
/// for each API and connection count.
pub fn run(opts: &Opts) -> Result<Vec<Figure>, String> {
    let duration = Duration::from_secs_f64(opts.duration.unwrap_or(5.0));
    let target = Target::start(&opts.source, Need::Any)?;
    crate::prime(&target)?;
    let mut runs = Vec::new();
    for &api in &opts.apis {
        for &k in &opts.conns {
            let names: Vec<String> = (0..opts.streams.unwrap_or(k).min(k))
                .map(|i| format!("pub-{}-{}-{k}-{i}", opts.run_id, api.name()))
                .collect();
            let mut app = Appender::new(&target.site, api, &names, k, Some(duration), None);
            let mut eo = Options::new(Instant::now() + duration + Duration::from_secs(60));
            eo.connect_all_first = true;
            let before = WriterStats::scrape(&target);
            let disk_before = disk_of(&target);
            let (transport, server) = chart::sampled(target.pid, Instant::now(), || {
                engine::run(&target.nodes, k, &mut app, &eo)
            });
            let writer = before
                .zip(WriterStats::scrape(&target))
                .map(|(b, a)| a.since(b));
            let disk_bytes = disk_before
                .zip(disk_of(&target))
                .map(|(b, a)| a.saturating_sub(b));
            eprintln!(
                "load: publish {} x{k}: {:.0} events/s",
                api.name(),
                app.rate()
            );
            Report {
                name: format!("publish-{}-x{k}-{}", api.name(), target.kind),
                title: format!(
                    "publish: {k} connections appending through {} ({} server, 200s only)",
                    api.name(),
                    target.kind
                ),
                latency: "request",
                unit: "events",
                timeline: std::mem::take(&mut app.timeline),
                server,
            }
            .write(opts)?;
            runs.push(Run {
                api,
                conns: k,
                app,
                transport,
                writer,
                disk_bytes,
            });
        }
    }
    let mut rows = Vec::new();
    let mut json_runs = Vec::new();
    for run in &mut runs {
        let lat = Latency::of(&mut run.app.lat);
        rows.push(vec![
            run.api.name().to_owned(),
            run.conns.to_string(),
            format!("{:.0}", run.app.rate()),
            cell_ms(lat.p50),
            cell_ms(lat.p99),
            cell_ms(lat.max),
            run.app.ok.to_string(),
            run.app.errors().to_string(),
            format!("{:.1}", run.app.elapsed()),
            format!("{:.0}%", cpu_pct(&run.transport)),
            run.writer
                .map_or("-".into(), |w| format!("{:.1}", w.mean_batch())),
            run.writer
                .map_or("-".into(), |w| format!("{:.2}", w.mean_commit_ms())),
            run.writer
                .map_or("-".into(), |w| format!("{:.1}", w.us_per_job())),
            disk_per_event(run).map_or("-".into(), |b| format!("{:.1}", b / 1024.0)),
        ]);
        json_runs.push(json!({
            "api": run.api.name(),
            "conns": run.conns,
            "events_per_s": run.app.rate().round(),
            "ok": run.app.ok,
            "statuses": run.app.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "lost": run.app.lost,
            "bad_bodies": run.app.bad_bodies,
            "broken_connections": run.transport.broken,
            "seconds": run.app.elapsed(),
            "latency": lat.json(),
            "bench_cpu_pct": cpu_pct(&run.transport),
            "disk_write_bytes_per_event": disk_per_event(run).map(f64::round),
            "writer": run.writer.map(|w| json!({
                "commits": w.commits,
                "mean_batch": (w.mean_batch() * 10.0).round() / 10.0,
                "mean_commit_ms": (w.mean_commit_ms() * 1000.0).round() / 1000.0,
                "us_per_event": (w.us_per_job() * 10.0).round() / 10.0,
            })),
        }));
    }
    report::table(
        &format!("publish ({} server, durable 200s only)", target.kind),
        &[
            "api",
            "conns",
            "events/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "ok",
            "errors",
            "secs",
            "bench CPU",
            "batch",
            "commit ms",
            "µs/ev",
            "disk KiB/ev",
        ],
        &rows,
    );
    let mut ratios = serde_json::Map::new();
    for api in &opts.apis {
        let rate = |k: usize| {
            runs.iter()
                .find(|r| r.api == *api && r.conns == k)
                .map(|r| r.app.rate())
        };
        if let (Some(one), Some(many)) = (rate(1), rate(64)) {
            let ratio = if one > 0.0 { many / one } else { 0.0 };
            report::note(&format!(
                "group commit, {}: 64 connections {:.0}/s vs 1 connection {:.0}/s = {ratio:.1}x",
                api.name(),
                many,
                one
            ));
            ratios.insert(api.name().to_owned(), json!((ratio * 10.0).round() / 10.0));
        }
    }
    report::note(
        "batch, commit ms, µs/ev: the server's mean jobs per commit, time per commit and the \
         writer's time per job (its /metrics);",
    );
    report::note(
        "disk KiB/ev: bytes the server process wrote to storage per event (/proc/<pid>/io)",
    );
    for run in &runs {
        for e in &run.transport.first_errors {
            report::note(&format!("{} x{}: {e}", run.api.name(), run.conns));
        }
    }
    report::json_line(json!({
        "scenario": "publish",
        "target": target.kind,
        "duration_s": duration.as_secs_f64(),
        "runs": json_runs,
        "group_commit_ratio_64_vs_1": ratios,
    }));
    Ok(runs
        .iter()
        .map(|run| {
            let name = format!("{} x{} events/s", run.api.name(), run.conns);
            Figure::new(name, run.app.rate().round())
        })
        .collect())
}
