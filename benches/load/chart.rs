//! `--report DIR`: a scenario run's figures over time, as an SVG chart and the JSON it was
//! drawn from.
//!
//! While a scenario runs, its clients put every latency they measure into a [`Timeline`]:
//! one bucket per tenth of a second of the run (a push onto a vector), so the chart can show
//! the p50, p99 and largest latency of each interval and how many requests or deliveries
//! completed in it; the interval is 0.1 s for short runs and widens to keep a long one under
//! 150 points. When the server is a process of its own, [`sampled`] reads its memory,
//! threads and descriptors from `/proc` every 500 ms alongside. [`Report::write`] then saves
//! `NAME.json` (the figures) and `NAME.svg` (up to four panels sharing the time axis:
//! latency on a log scale, throughput, RSS, threads and descriptors), drawn with plotters'
//! SVG backend. NAME is the scenario, its size and the server's kind (`fanout-9000-spawned`),
//! so with `--versus-floor` eventserver's and the bare engine's charts sit side by side, the
//! last round's of each.

use std::error::Error;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::Opts;
use crate::report::{Latency, ProcSample, ms};

/// Latencies by the tenth of a second of the run in which they completed.
#[derive(Debug, Default)]
pub struct Timeline {
    tenths: Vec<Vec<u64>>,
}

/// Interval widths a chart may use, in tenths of a second: the narrowest that keeps a run
/// under [`MAX_INTERVALS`] points, so a 2 s run still shows a curve and an hour stays legible.
const WIDTHS: [usize; 8] = [1, 2, 5, 10, 20, 50, 100, 300];
const MAX_INTERVALS: usize = 150;

impl Timeline {
    /// Records a latency of `latency_us` completed `at_us` after the run's start.
    pub fn record(&mut self, at_us: u64, latency_us: u64) {
        let tenth = (at_us / 100_000) as usize;
        if self.tenths.len() <= tenth {
            self.tenths.resize_with(tenth + 1, Vec::new);
        }
        self.tenths[tenth].push(latency_us);
    }

    /// Adds another thread's timeline of the same run to this one.
    pub fn merge(&mut self, other: Timeline) {
        if self.tenths.len() < other.tenths.len() {
            self.tenths.resize_with(other.tenths.len(), Vec::new);
        }
        for (mine, mut theirs) in self.tenths.iter_mut().zip(other.tenths) {
            mine.append(&mut theirs);
        }
    }

    /// The interval width in seconds and each interval's percentiles (its count over the
    /// width is the throughput).
    fn intervals(self) -> (f64, Vec<Latency>) {
        let width = WIDTHS
            .into_iter()
            .find(|w| self.tenths.len().div_ceil(*w) <= MAX_INTERVALS)
            .unwrap_or(WIDTHS[WIDTHS.len() - 1]);
        let intervals = self
            .tenths
            .chunks(width)
            .map(|chunk| Latency::of(&mut chunk.concat()))
            .collect();
        (width as f64 / 10.0, intervals)
    }
}

/// Runs `f` while a thread samples `pid` every 500 ms (nothing when `pid` is `None`);
/// `f`'s result and the samples, each at its seconds since `epoch`.
pub fn sampled<R>(
    pid: Option<u32>,
    epoch: Instant,
    f: impl FnOnce() -> R,
) -> (R, Vec<(f64, ProcSample)>) {
    let Some(pid) = pid else {
        return (f(), Vec::new());
    };
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let sampler = std::thread::Builder::new()
            .name("proc-sampler".into())
            .spawn_scoped(scope, move || {
                let mut samples = Vec::new();
                loop {
                    if let Some(s) = ProcSample::read(pid) {
                        samples.push((epoch.elapsed().as_secs_f64(), s));
                    }
                    // A message or the sender's drop ends the sampling at once.
                    if stopped.recv_timeout(Duration::from_millis(500))
                        != Err(mpsc::RecvTimeoutError::Timeout)
                    {
                        return samples;
                    }
                }
            })
            .expect("spawn the /proc sampler");
        let result = f();
        drop(stop);
        (result, sampler.join().expect("the /proc sampler"))
    })
}

/// One chart: what a scenario run measured, second by second.
pub struct Report {
    /// File name without extension, e.g. `fanout-1000`.
    pub name: String,
    /// The chart's title: the scenario and its parameters.
    pub title: String,
    /// What the latencies are, e.g. `publish→delivery`.
    pub latency: &'static str,
    /// What completes and is counted per second, e.g. `deliveries`.
    pub unit: &'static str,
    /// The latencies measured.
    pub timeline: Timeline,
    /// The server's memory and threads, when it is a process of its own.
    pub server: Vec<(f64, ProcSample)>,
}

impl Report {
    /// With `--report DIR`, writes `DIR/NAME.json` and `DIR/NAME.svg` and says so on
    /// stderr; without, nothing.
    pub fn write(self, opts: &Opts) -> Result<(), String> {
        let Some(dir) = &opts.report else {
            return Ok(());
        };
        let json_path = dir.join(format!("{}.json", self.name));
        let svg_path = dir.join(format!("{}.svg", self.name));
        let Report {
            title,
            latency,
            unit,
            timeline,
            server,
            ..
        } = self;
        let (width, intervals) = timeline.intervals();
        let chart = Chart {
            title,
            latency,
            unit,
            width,
            intervals,
            server,
        };
        std::fs::write(&json_path, format!("{:#}\n", chart.json()))
            .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
        chart
            .draw(&svg_path)
            .map_err(|e| format!("cannot draw {}: {e}", svg_path.display()))?;
        eprintln!("load: report {}", svg_path.display());
        Ok(())
    }
}

/// A report's figures as drawn: latencies summarised per interval.
struct Chart {
    title: String,
    latency: &'static str,
    unit: &'static str,
    /// Interval width, seconds.
    width: f64,
    intervals: Vec<Latency>,
    server: Vec<(f64, ProcSample)>,
}

impl Chart {
    fn json(&self) -> Value {
        json!({
            "title": self.title,
            "latency": self.latency,
            "unit": self.unit,
            "interval_s": self.width,
            "intervals": self.intervals.iter().enumerate().filter(|(_, l)| l.n > 0).map(|(i, l)| {
                let mut j = l.json();
                j["t_s"] = json!(round1(i as f64 * self.width));
                j["per_s"] = json!(round1(l.n as f64 / self.width));
                j
            }).collect::<Vec<_>>(),
            "server": self.server.iter().map(|(t, s)| {
                let mut j = s.json();
                j["t_s"] = json!(round1(*t));
                j
            }).collect::<Vec<_>>(),
        })
    }

    fn draw(&self, path: &Path) -> Result<(), Box<dyn Error>> {
        // Each interval's figures are drawn at its middle.
        let done: Vec<(f64, &Latency)> = self
            .intervals
            .iter()
            .enumerate()
            .filter(|(_, l)| l.n > 0)
            .map(|(i, l)| ((i as f64 + 0.5) * self.width, l))
            .collect();
        let end = self
            .server
            .last()
            .map_or(0.0, |(t, _)| *t)
            .max(self.intervals.len() as f64 * self.width)
            .max(1.0);
        let panels = 2 * usize::from(!done.is_empty()) + 2 * usize::from(!self.server.is_empty());
        let height = 40 + 250 * panels.max(1) as u32;
        let root = SVGBackend::new(path, (960, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&self.title, ("sans-serif", 20))?;
        let areas = root.split_evenly((panels.max(1), 1));
        let mut areas = areas.iter();
        if !done.is_empty()
            && let (Some(lat_area), Some(rate_area)) = (areas.next(), areas.next())
        {
            let ms_of = |f: fn(&Latency) -> u64| -> Vec<(f64, f64)> {
                // A log axis has no zero: a sub-10 µs latency shows as 0.01 ms.
                done.iter().map(|(t, l)| (*t, ms(f(l)).max(0.01))).collect()
            };
            // Whole decades, two at least: plotters then labels the powers of ten only,
            // where a part of a decade gets a crowd of labels near its top.
            let decade = |ms: f64, round: fn(f64) -> f64| 10f64.powf(round(ms.log10()));
            let top = decade(
                done.iter().map(|(_, l)| ms(l.max)).fold(0.01, f64::max),
                f64::ceil,
            );
            let bottom = decade(
                done.iter().map(|(_, l)| ms(l.p50)).fold(top, f64::min),
                f64::floor,
            )
            .min(top / 100.0);
            panel(
                lat_area,
                &format!(
                    "{} latency per {} s, ms (log scale): max black, p99 red, p50 blue",
                    self.latency, self.width
                ),
                (bottom..top).log_scale(),
                end,
                // Drawn in this order so that a p99 equal to the max still shows.
                &[
                    (BLACK, ms_of(|l| l.max)),
                    (RED, ms_of(|l| l.p99)),
                    (BLUE, ms_of(|l| l.p50)),
                ],
            )?;
            let rate: Vec<(f64, f64)> = done
                .iter()
                .map(|(t, l)| (*t, l.n as f64 / self.width))
                .collect();
            let top = rate.iter().map(|p| p.1).fold(1.0, f64::max);
            panel(
                rate_area,
                &format!("{} per second", self.unit),
                0.0..top * 1.1,
                end,
                &[(GREEN_DARK, rate)],
            )?;
        }
        if let (Some(rss_area), Some(threads_area)) = (areas.next(), areas.next()) {
            let series = |f: fn(&ProcSample) -> f64| -> Vec<(f64, f64)> {
                self.server.iter().map(|(t, s)| (*t, f(s))).collect()
            };
            let rss = series(|s| s.rss_kib as f64 / 1024.0);
            let top = rss.iter().map(|p| p.1).fold(1.0, f64::max);
            panel(
                rss_area,
                "server RSS (MiB)",
                0.0..top * 1.1,
                end,
                &[(MAGENTA, rss)],
            )?;
            let (threads, fds) = (series(|s| s.threads as f64), series(|s| s.fds as f64));
            let top = threads.iter().chain(&fds).map(|p| p.1).fold(1.0, f64::max);
            panel(
                threads_area,
                "server threads (blue) and open descriptors (black)",
                0.0..top * 1.1,
                end,
                &[(BLUE, threads), (BLACK, fds)],
            )?;
        }
        root.present()?;
        Ok(())
    }
}

/// A darker green than plotters' `GREEN`, which is hard to see on white.
const GREEN_DARK: RGBColor = RGBColor(0, 140, 0);

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// An axis label: no decimals on whole numbers or past 10, two below 1.
fn label(v: &f64) -> String {
    match v.abs() {
        a if a >= 10.0 || a.fract() == 0.0 => format!("{v:.0}"),
        a if a >= 1.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// One panel: `lines` (colour, (seconds, value) points) over seconds `0..end` against
/// `y`; the caption names the colours, where a legend box would hide part of a line.
fn panel<Y>(
    area: &DrawingArea<SVGBackend, Shift>,
    caption: &str,
    y: Y,
    end: f64,
    lines: &[(RGBColor, Vec<(f64, f64)>)],
) -> Result<(), Box<dyn Error>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, y)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .x_desc("seconds since the run began")
        .x_label_formatter(&label)
        .y_label_formatter(&label)
        .draw()?;
    for (colour, points) in lines {
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            colour.stroke_width(2),
        ))?;
    }
    Ok(())
}
