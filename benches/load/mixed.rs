//! The **mixed** scenario: everything at once on one spawned server for 60 s (by default):
//! 9,000 parked long-poll subscribers over 100 categories fed 20 random publishes a second,
//! 16 streams-API producers appending as fast as they can, and two consumers following one
//! of their streams with GET + ACK. Reports each part's figures plus the server's RSS and
//! threads at the start, at the end and at their peak (no growth beyond the working set).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::chart::{self, Report};
use crate::consume::Consumers;
use crate::engine::{self, Options};
use crate::publish::Appender;
use crate::report::{self, Latency, ProcSample, cell_ms, percent};
use crate::subscribe::{Plan, publish_paced};
use crate::target::{Need, Target};
use crate::verdict::judge;
use crate::{Api, Opts, Rng};

/// Producers appending at full speed.
const PRODUCERS: usize = 16;
/// Consumers following the first producer's stream.
const CONSUMERS: usize = 2;
/// Categories the subscribers spread over.
const CATEGORIES: usize = 100;
/// Long-poll publishes per second.
const PUBLISH_RATE: f64 = 20.0;

/// Runs the mixed scenario.
pub fn run(opts: &Opts) -> Result<(), String> {
    let secs = opts.duration.unwrap_or(60.0);
    let span = Duration::from_secs_f64(secs);
    let n = opts.idle;
    let k = CATEGORIES.min(n.max(1));
    let target = Target::start(&opts.source, Need::OwnProcess)?;
    crate::prime(&target)?;
    let pid = target.pid;
    let categories = Arc::new(
        (0..k)
            .map(|c| format!("mix-{}-{c}", opts.run_id))
            .collect::<Vec<_>>(),
    );
    let streams: Vec<String> = (0..PRODUCERS)
        .map(|i| format!("mix-{}-s{i}", opts.run_id))
        .collect();
    let plan = Plan::new(&target, categories.clone(), n, opts, secs);
    let epoch = plan.epoch;
    let (site, nodes) = (&target.site, &target.nodes);
    let mut parts = None;
    let mut outcome = plan.run(|_| {
        let start = pid.and_then(ProcSample::read);
        let ((published, app, cons), samples) = chart::sampled(pid, epoch, || {
            std::thread::scope(|s| {
                let producers = s.spawn(|| {
                    let mut app =
                        Appender::new(site, Api::Streams, &streams, PRODUCERS, Some(span), None);
                    let mut eo = Options::new(Instant::now() + span + Duration::from_secs(60));
                    eo.connect_all_first = true;
                    let stats = engine::run(nodes, PRODUCERS, &mut app, &eo);
                    (app, stats)
                });
                let consumers = s.spawn(|| {
                    let until = Instant::now() + span;
                    let mut c = Consumers::new(
                        site,
                        &streams[0],
                        "mixed",
                        CONSUMERS,
                        opts.limit,
                        None,
                        Some(until),
                    );
                    let eo = Options::new(until + Duration::from_secs(60));
                    let stats = engine::run(nodes, CONSUMERS, &mut c, &eo);
                    (c, stats)
                });
                let mut rng = Rng::new(0x3141);
                let count = (PUBLISH_RATE * secs) as usize;
                let published = publish_paced(
                    site,
                    &categories,
                    count,
                    Duration::from_secs_f64(1.0 / PUBLISH_RATE),
                    epoch,
                    |_| rng.below(k as u64) as u32,
                );
                let app = producers.join().expect("producer thread");
                let cons = consumers.join().expect("consumer thread");
                (published, app, cons)
            })
        });
        parts = Some((start, app, cons, samples));
        published
    })?;
    let end = pid.and_then(ProcSample::read);
    let (start, (mut app, app_stats), (mut cons, cons_stats), samples) =
        parts.ok_or("the mixed run did not finish")?;
    let v = judge(&mut outcome.shards, &outcome.published, k);
    let app_lat = Latency::of(&mut app.lat);
    let cons_lat = Latency::of(&mut cons.take_get_latency());
    let peak = samples.iter().map(|(_, s)| *s).max_by_key(|s| s.rss_kib);
    let mib = |s: Option<ProcSample>| {
        s.map_or("-".into(), |s| {
            format!("{:.0} MiB / {} thr", s.rss_kib as f64 / 1024.0, s.threads)
        })
    };
    report::table(
        &format!(
            "mixed ({} server, {secs:.0} s, {n} subscribers over {k} categories)",
            target.kind
        ),
        &[
            "part", "rate/s", "p50 ms", "p99 ms", "max ms", "checked", "errors",
        ],
        &[
            vec![
                format!("append x{PRODUCERS}"),
                format!("{:.0}", app.rate()),
                cell_ms(app_lat.p50),
                cell_ms(app_lat.p99),
                cell_ms(app_lat.max),
                format!("{} ok", app.ok),
                (app.errors() + app_stats.broken).to_string(),
            ],
            vec![
                format!("consume x{CONSUMERS}"),
                format!(
                    "{:.0}",
                    if cons.seconds() > 0.0 {
                        cons.read() as f64 / cons.seconds()
                    } else {
                        0.0
                    }
                ),
                cell_ms(cons_lat.p50),
                cell_ms(cons_lat.p99),
                cell_ms(cons_lat.max),
                format!("{} read, {} dups", cons.read(), cons.duplicates()),
                (cons.errors() + cons_stats.broken).to_string(),
            ],
            vec![
                format!("fanout x{n}"),
                format!("{PUBLISH_RATE:.0}"),
                cell_ms(v.latency.p50),
                cell_ms(v.latency.p99),
                cell_ms(v.latency.max),
                format!(
                    "{}% delivered, {} dups, {} ooo",
                    percent(v.delivered, v.expected),
                    v.duplicates,
                    v.out_of_order
                ),
                v.error_count().to_string(),
            ],
        ],
    );
    report::note(&format!(
        "subscribers: {}{}",
        v.notes(),
        outcome.published.notes()
    ));
    report::note(&format!(
        "server: start {}, end {}, peak {}",
        mib(start),
        mib(end),
        mib(peak)
    ));
    report::json_line(json!({
        "scenario": "mixed",
        "target": target.kind,
        "seconds": secs,
        "append": {
            "producers": PRODUCERS,
            "events_per_s": app.rate().round(),
            "ok": app.ok,
            "errors": app.errors() + app_stats.broken,
            "latency": app_lat.json(),
        },
        "consume": {
            "consumers": CONSUMERS,
            "events_read": cons.read(),
            "duplicates": cons.duplicates(),
            "same_order": cons.same_order(None),
            "errors": cons.errors() + cons_stats.broken,
            "get_latency": cons_lat.json(),
        },
        "fanout": v.json(),
        "fanout_publish_errors": outcome.published.errors,
        "fanout_publish_error_samples": outcome.published.error_samples,
        "server_start": start.map(|s| s.json()),
        "server_end": end.map(|s| s.json()),
        "server_peak": peak.map(|s| s.json()),
        "rss_samples_kib": samples.iter().map(|(t, s)| json!([(t * 10.0).round() / 10.0, s.rss_kib])).collect::<Vec<_>>(),
    }));
    Report {
        name: format!("mixed-{n}-{}", target.kind),
        title: format!(
            "mixed: {n} subscribers over {k} categories, {PRODUCERS} appenders, {CONSUMERS} consumers, {secs:.0} s ({} server)",
            target.kind
        ),
        latency: "publish→delivery",
        unit: "deliveries",
        timeline: outcome.timeline(),
        server: samples,
    }
    .write(opts)?;
    Ok(())
}
