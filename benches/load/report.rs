//! Figures and their presentation: latency percentiles, the human table, the JSON line, a
//! scenario's headline figures, and a server process's memory and threads from `/proc`.

use serde_json::{Value, json};

/// Percentiles of a set of latencies, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Latency {
    /// Summarises `samples` (µs), sorting them in place.
    pub fn of(samples: &mut [u64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Latency {
            n: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }

    /// As a JSON object in milliseconds.
    pub fn json(&self) -> Value {
        json!({ "n": self.n, "p50_ms": ms(self.p50), "p99_ms": ms(self.p99), "max_ms": ms(self.max) })
    }
}

/// One headline figure of a scenario run, which `--versus-floor` sets against the bare
/// engine's.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What it measures, unit included (`fanout 1000 p99 ms`).
    pub name: String,
    /// Its value in that unit.
    pub value: f64,
}

impl Figure {
    /// The figure `name` with `value`.
    pub fn new(name: impl Into<String>, value: f64) -> Figure {
        Figure {
            name: name.into(),
            value,
        }
    }
}

/// Microseconds as milliseconds with three decimals.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Microseconds as a table cell in milliseconds.
pub fn cell_ms(us: u64) -> String {
    if us >= 100_000 {
        format!("{:.0}", us as f64 / 1000.0)
    } else {
        format!("{:.2}", us as f64 / 1000.0)
    }
}

/// Prints a titled, column-aligned table.
pub fn table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    println!("\n== {title}");
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        println!("  {}", parts.join("  "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Prints a notes line under a table.
pub fn note(text: &str) {
    println!("  {text}");
}

/// Prints the scenario's machine-readable line.
pub fn json_line(value: Value) {
    println!("{value}");
}

/// A process's resident memory and threads, from `/proc/<pid>/status`, and its open
/// descriptors.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors (0 when `/proc/<pid>/fd` cannot be read).
    pub fds: u64,
}

impl ProcSample {
    /// Reads the figures of `pid`, if it still runs.
    pub fn read(pid: u32) -> Option<ProcSample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        Some(ProcSample {
            rss_kib: field("VmRSS:")?,
            threads: field("Threads:")?,
            fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
        })
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        json!({ "rss_kib": self.rss_kib, "threads": self.threads, "fds": self.fds })
    }
}

/// Percent with one decimal, for delivered/expected.
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        (part as f64 * 1000.0 / whole as f64).round() / 10.0
    }
}

/// Bytes a process has caused to be written to storage so far (`/proc/<pid>/io`
/// `write_bytes`), or of this process when `pid` is `None`.
pub fn disk_write_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/io"),
        None => "/proc/self/io".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The median of `values` (the mean of the middle two for an even count), if any.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some((sorted[mid - 1] + sorted[mid]) / 2.0),
    }
}

/// `v` rounded to three decimals, for the JSON line.
pub fn thousandths(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A figure as a table cell: whole above 100, else with up to two decimals.
pub fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
