//! The subscriber scenarios: **fanout** (N subscribers on one category, M events at a fixed
//! interval), **categories** (subscribers spread over many categories, random publishes) and
//! **idle** (N parked subscribers held: the server's memory, threads and descriptors).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::Opts;
use crate::chart::{self, Report};
use crate::report::{self, Figure, Latency, ProcSample, cell_ms, percent};
use crate::subscribe::{Plan, Published, publish_paced};
use crate::target::{Need, Target};
use crate::verdict::{Verdict, judge};

/// Whether `n` subscribers plus the server's two descriptors per connection fit here.
fn fits_in_process(n: usize, nofile: u64) -> bool {
    (3 * n + 1024) as u64 <= nofile
}

/// The fanout scenario, for each subscriber count; its figures are delivery p99 and
/// delivered % at each.
pub fn fanout(opts: &Opts, nofile: u64) -> Result<Vec<Figure>, String> {
    let interval = Duration::from_millis(opts.interval_ms);
    let mut figures = Vec::new();
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    for &n in &opts.subscribers {
        let need = if fits_in_process(n, nofile) {
            Need::Any
        } else {
            Need::OwnProcess
        };
        let target = Target::start(&opts.source, need)?;
        crate::prime(&target)?;
        let categories = Arc::new(vec![format!("fanout-{}-{n}", opts.run_id)]);
        let secs = opts.events as f64 * interval.as_secs_f64();
        let plan = Plan::new(&target, categories.clone(), n, opts, secs);
        let epoch = plan.epoch;
        let mut parked_sample = None;
        let (outcome, server) = chart::sampled(target.pid, epoch, || {
            plan.run(|_| {
                parked_sample = target.pid.and_then(ProcSample::read);
                publish_paced(
                    &target.site,
                    &categories,
                    opts.events,
                    interval,
                    epoch,
                    |_| 0,
                )
            })
        });
        let mut outcome = outcome?;
        let v = judge(&mut outcome.shards, &outcome.published, 1);
        let ack = Latency::of(&mut outcome.published.ack_lat);
        eprintln!(
            "load: fanout {n}: delivery p99 {} ms, {}/{} delivered",
            cell_ms(v.latency.p99),
            v.delivered,
            v.expected
        );
        figures.extend(headline(&format!("fanout {n}"), &v));
        Report {
            name: format!("fanout-{n}-{}", target.kind),
            title: format!(
                "fanout: {n} subscribers, {} events one every {} ms ({} server)",
                opts.events, opts.interval_ms, target.kind
            ),
            latency: "publish→delivery",
            unit: "deliveries",
            timeline: outcome.timeline(),
            server,
        }
        .write(opts)?;
        rows.push(vec![
            n.to_string(),
            target.kind.to_owned(),
            cell_ms(v.latency.p50),
            cell_ms(v.latency.p99),
            cell_ms(v.latency.max),
            other_node_p99(&v),
            cell_ms(v.to_all.p50),
            cell_ms(v.to_all.max),
            format!("{}%", percent(v.delivered, v.expected)),
            v.duplicates.to_string(),
            v.out_of_order.to_string(),
            v.error_count().to_string(),
            parked_sample.map_or("-".into(), |s| format!("{:.0}", s.rss_kib as f64 / 1024.0)),
        ]);
        let mut j = v.json();
        j["target"] = json!(target.kind);
        j["events"] = json!(opts.events);
        j["interval_ms"] = json!(opts.interval_ms);
        j["park_seconds"] = json!(outcome.park_time.as_secs_f64());
        j["publish_ack_latency"] = ack.json();
        j["publish_errors"] = json!(outcome.published.errors);
        j["publish_error_samples"] = json!(outcome.published.error_samples);
        j["publish_schedule_lag_ms"] = json!(outcome.published.schedule_lag as f64 / 1000.0);
        j["server_parked"] = parked_sample.map_or(Value::Null, |s| s.json());
        runs.push(j);
        notes.push(format!(
            "{n} subs: parked in {:.2} s; publish ack p50 {} ms; {}{}",
            outcome.park_time.as_secs_f64(),
            cell_ms(ack.p50),
            v.notes(),
            outcome.published.notes()
        ));
    }
    report::table(
        &format!(
            "fanout ({} events, one every {} ms, resume with since_time/last_id)",
            opts.events, opts.interval_ms
        ),
        &[
            "subs",
            "server",
            "p50 ms",
            "p99 ms",
            "max ms",
            "other p99",
            "all p50",
            "all max",
            "delivered",
            "dups",
            "ooo",
            "errors",
            "RSS MiB",
        ],
        &rows,
    );
    report::note(
        "p50/p99/max: publish→delivery per subscriber and event; all: publish→last subscriber per event",
    );
    report::note(
        "other p99: publish→delivery on the nodes other than the one published through (several nodes only)",
    );
    for line in &notes {
        report::note(line);
    }
    report::json_line(json!({ "scenario": "fanout", "runs": runs }));
    Ok(figures)
}

/// A subscriber run's figures, named after `what`: delivery p50 and p99, p99 on the nodes
/// other than the publisher's (when there are several), and delivered %.
fn headline(what: &str, v: &Verdict) -> Vec<Figure> {
    let mut figures = vec![
        Figure::new(format!("{what} p50 ms"), report::ms(v.latency.p50)),
        Figure::new(format!("{what} p99 ms"), report::ms(v.latency.p99)),
    ];
    if v.other_node.n > 0 {
        figures.push(Figure::new(
            format!("{what} other-node p99 ms"),
            report::ms(v.other_node.p99),
        ));
    }
    figures.push(Figure::new(
        format!("{what} delivered %"),
        percent(v.delivered, v.expected),
    ));
    figures
}

/// The p99 delivery latency on nodes other than the publisher's, as a cell.
fn other_node_p99(v: &Verdict) -> String {
    match v.other_node.n {
        0 => "-".into(),
        _ => cell_ms(v.other_node.p99),
    }
}

/// The categories scenario; its figures are delivery p99 and delivered %.
pub fn categories(opts: &Opts) -> Result<Vec<Figure>, String> {
    let secs = opts.duration.unwrap_or(10.0);
    let n = opts.category_subscribers;
    let k = opts.categories.min(n.max(1));
    let target = Target::start(&opts.source, Need::OwnProcess)?;
    crate::prime(&target)?;
    let categories = Arc::new(
        (0..k)
            .map(|c| format!("cat-{}-{c}", opts.run_id))
            .collect::<Vec<_>>(),
    );
    let count = (opts.rate * secs).ceil() as usize;
    let plan = Plan::new(&target, categories.clone(), n, opts, secs);
    let epoch = plan.epoch;
    let mut rng = crate::Rng::new(0x5eed);
    let (outcome, server) = chart::sampled(target.pid, epoch, || {
        plan.run(|_| {
            publish_paced(
                &target.site,
                &categories,
                count,
                Duration::from_secs_f64(1.0 / opts.rate),
                epoch,
                |_| rng.below(k as u64) as u32,
            )
        })
    });
    let mut outcome = outcome?;
    let v = judge(&mut outcome.shards, &outcome.published, k);
    Report {
        name: format!("categories-{n}-{}", target.kind),
        title: format!(
            "categories: {n} subscribers over {k} categories, {count} random publishes at {}/s ({} server)",
            opts.rate, target.kind
        ),
        latency: "publish→delivery",
        unit: "deliveries",
        timeline: outcome.timeline(),
        server,
    }
    .write(opts)?;
    report::table(
        &format!(
            "categories ({} server, {n} subscribers over {k} categories, {count} random publishes at {}/s)",
            target.kind, opts.rate
        ),
        &[
            "p50 ms",
            "p99 ms",
            "max ms",
            "delivered",
            "exact subs",
            "dups",
            "ooo",
            "foreign",
            "errors",
        ],
        &[vec![
            cell_ms(v.latency.p50),
            cell_ms(v.latency.p99),
            cell_ms(v.latency.max),
            format!(
                "{}/{} ({}%)",
                v.delivered,
                v.expected,
                percent(v.delivered, v.expected)
            ),
            format!("{}/{}", v.exact, v.subscribers),
            v.duplicates.to_string(),
            v.out_of_order.to_string(),
            v.foreign.to_string(),
            v.error_count().to_string(),
        ]],
    );
    report::note(&format!(
        "parked in {:.2} s; {}",
        outcome.park_time.as_secs_f64(),
        v.notes()
    ));
    let mut j = v.json();
    j["scenario"] = json!("categories");
    j["target"] = json!(target.kind);
    j["categories"] = json!(k);
    j["published"] = json!(count);
    j["publish_errors"] = json!(outcome.published.errors);
    j["publish_error_samples"] = json!(outcome.published.error_samples);
    j["park_seconds"] = json!(outcome.park_time.as_secs_f64());
    report::json_line(j);
    Ok(headline("categories", &v))
}

/// The idle scenario: server memory, threads and descriptors with N parked subscribers.
pub fn idle(opts: &Opts) -> Result<(), String> {
    let hold = Duration::from_secs_f64(opts.duration.unwrap_or(10.0));
    let n = opts.idle;
    let target = Target::start(&opts.source, Need::OwnProcess)?;
    crate::prime(&target)?;
    let Some(pid) = target.pid else {
        return Err("idle needs the server's pid: pass --pid with --url".into());
    };
    let before = ProcSample::read(pid).ok_or("cannot read the server's /proc status")?;
    let categories = Arc::new(vec![format!("idle-{}", opts.run_id)]);
    let plan = Plan {
        drain: Duration::ZERO,
        ..Plan::new(&target, categories, n, opts, hold.as_secs_f64())
    };
    let epoch = plan.epoch;
    let mut last = None;
    let (outcome, mut samples) = chart::sampled(Some(pid), epoch, || {
        plan.run(|_| {
            std::thread::sleep(hold);
            last = ProcSample::read(pid);
            Published::default()
        })
    });
    let mut outcome = outcome?;
    let last = last.unwrap_or_default();
    let ((after, settled), closed) = chart::sampled(Some(pid), epoch, || {
        std::thread::sleep(Duration::from_secs(2));
        let after = ProcSample::read(pid);
        // By then a server has let go of the polls of clients that went away, and
        // tiny_http's pool has ended the threads that were left idle for its 5 s.
        std::thread::sleep(Duration::from_secs(6));
        (after, ProcSample::read(pid))
    });
    let peak = samples
        .iter()
        .map(|(_, s)| *s)
        .max_by_key(|s| s.rss_kib)
        .unwrap_or_default();
    samples.extend(closed);
    let per = (last.rss_kib.saturating_sub(before.rss_kib)) as f64 / n.max(1) as f64;
    let answered: u64 = outcome
        .shards
        .iter()
        .map(|(s, _)| s.subs.iter().map(|x| x.got.len() as u64).sum::<u64>() + s.timeouts)
        .sum();
    let v = judge(&mut outcome.shards, &Published::default(), 1);
    let errors = v.error_count();
    Report {
        name: format!("idle-{n}-{}", target.kind),
        title: format!(
            "idle: {n} parked subscribers held {:.0} s, then closed ({} server)",
            hold.as_secs_f64(),
            target.kind
        ),
        latency: "poll",
        unit: "early answers",
        timeline: outcome.timeline(),
        server: samples,
    }
    .write(opts)?;
    let row = |label: &str, sample: Option<ProcSample>| {
        vec![
            label.to_owned(),
            sample.map_or("-".into(), |s| format!("{:.1}", s.rss_kib as f64 / 1024.0)),
            sample.map_or("-".into(), |s| s.threads.to_string()),
            sample.map_or("-".into(), |s| s.fds.to_string()),
        ]
    };
    report::table(
        &format!(
            "idle ({} server, pid {pid}, {n} parked subscribers held {:.0} s)",
            target.kind,
            hold.as_secs_f64()
        ),
        &["", "RSS MiB", "threads", "descriptors"],
        &[
            row("before", Some(before)),
            row("parked", Some(last)),
            row("peak", Some(peak)),
            row("closed +2 s", after),
            row("closed +8 s", settled),
        ],
    );
    report::note(&format!(
        "RSS per parked subscriber: {per:.1} KiB; parked in {:.2} s; answered early {answered}; {}",
        outcome.park_time.as_secs_f64(),
        v.notes()
    ));
    report::json_line(json!({
        "scenario": "idle",
        "target": target.kind,
        "subscribers": n,
        "hold_s": hold.as_secs_f64(),
        "before": before.json(),
        "parked": last.json(),
        "peak": peak.json(),
        "after_close": after.map_or(Value::Null, |a| a.json()),
        "after_close_8s": settled.map_or(Value::Null, |a| a.json()),
        "rss_kib_per_parked": (per * 10.0).round() / 10.0,
        "park_seconds": outcome.park_time.as_secs_f64(),
        "answered_early": answered,
        "errors": errors,
        "error_samples": v.samples,
    }));
    Ok(())
}
