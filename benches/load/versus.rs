//! `--versus-floor`: eventserver against the bare engine (`floor.rs`) in one command.
//!
//! For each scenario named (publish, fanout, categories), `--rounds` rounds (3 by default)
//! each run the scenario once against a fresh eventserver and once against a fresh floor
//! server, which goes first alternating from round to round, so that drift on the machine
//! (other work on the two cores) falls on both alike. Both run as processes of their own.
//! Each run prints its usual table; then a summary gives, per headline figure, every
//! round's value on each side, both medians and the ratio eventserver ÷ floor, and one JSON
//! line (`{"scenario": "versus-floor", …}`).
//!
//! The headline figures: **publish**, events/s on 64 keep-alive connections through
//! `/publish` and the streams API (`--api` picks; both by default), each against the
//! floor's `/publish`, the only write path it serves (a ratio below 1 is what
//! eventserver's durability and bookkeeping cost; `--streams 1` puts every connection on
//! one stream); **fanout**, delivery p50, p99 and delivered % at each
//! `--subscribers` count; **categories**, delivery p50, p99 and delivered % (for latencies a
//! ratio above 1 is eventserver's cost).

use serde_json::json;

use crate::report::{self, Figure, median, number, thousandths};
use crate::target::Source;
use crate::{Api, Opts};

/// The two servers compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Eventserver,
    Floor,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Eventserver => "eventserver",
            Side::Floor => "floor",
        }
    }

    /// `opts` for one run of `scenario` against this side.
    fn opts(self, opts: &Opts, scenario: &str) -> Opts {
        let mut opts = opts.clone();
        if let Source::Own {
            floor, own_process, ..
        } = &mut opts.source
        {
            *floor = self == Side::Floor;
            *own_process = true;
        }
        if scenario == "publish" {
            // The floor serves `/publish` only; eventserver's other write path is held
            // against the same figure.
            if self == Side::Floor {
                opts.apis = vec![Api::Publish];
            }
            opts.conns = vec![64];
        }
        opts
    }
}

/// One figure's values over the rounds, on each side.
struct Series {
    name: String,
    eventserver: Vec<f64>,
    floor: Vec<f64>,
}

impl Series {
    fn values(&mut self, side: Side) -> &mut Vec<f64> {
        match side {
            Side::Eventserver => &mut self.eventserver,
            Side::Floor => &mut self.floor,
        }
    }

    /// Eventserver's median over the floor's, when both have one and the floor's is not 0.
    fn ratio(&self) -> Option<f64> {
        let (es, floor) = (median(&self.eventserver)?, median(&self.floor)?);
        (floor != 0.0).then(|| es / floor)
    }
}

/// Gives the figures the floor has no value for (the streams API's appends) the floor's
/// value of the figure they are held against (`/publish`'s, on as many connections).
fn hold_against_publish(series: &mut [Series]) {
    let floor = |name: &str| {
        let publish = name.replacen(Api::Streams.name(), Api::Publish.name(), 1);
        series
            .iter()
            .find(|s| s.name == publish && !s.floor.is_empty())
            .map(|s| (s.name.clone(), s.floor.clone()))
    };
    let found: Vec<_> = series
        .iter()
        .map(|s| s.floor.is_empty().then(|| floor(&s.name)).flatten())
        .collect();
    for (s, found) in series.iter_mut().zip(found) {
        if let Some((name, values)) = found {
            s.name = format!("{} (floor: {name})", s.name);
            s.floor = values;
        }
    }
}

/// Runs `scenario` against eventserver and the floor, `rounds` times each, interleaved, and
/// prints the comparison.
pub fn compare(opts: &Opts, scenario: &str, rounds: usize, nofile: u64) -> Result<(), String> {
    let mut series: Vec<Series> = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Side::Eventserver, Side::Floor]
        } else {
            [Side::Floor, Side::Eventserver]
        };
        for side in order {
            eprintln!(
                "load: versus-floor {scenario}: round {}/{rounds}, {}",
                round + 1,
                side.name()
            );
            let figures = crate::run_scenario(&side.opts(opts, scenario), scenario, nofile)?;
            for Figure { name, value } in figures {
                let at = match series.iter().position(|s| s.name == name) {
                    Some(at) => at,
                    None => {
                        series.push(Series {
                            name,
                            eventserver: Vec::new(),
                            floor: Vec::new(),
                        });
                        series.len() - 1
                    }
                };
                series[at].values(side).push(value);
            }
        }
    }
    hold_against_publish(&mut series);
    print(scenario, rounds, &series);
    Ok(())
}

/// The summary table and JSON line.
fn print(scenario: &str, rounds: usize, series: &[Series]) {
    let cell = |v: Option<f64>| v.map_or("-".into(), number);
    let all = |values: &[f64]| {
        let cells: Vec<String> = values.iter().copied().map(number).collect();
        cells.join(" / ")
    };
    let rows: Vec<Vec<String>> = series
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                all(&s.eventserver),
                all(&s.floor),
                cell(median(&s.eventserver)),
                cell(median(&s.floor)),
                s.ratio().map_or("-".into(), |r| format!("{r:.2}")),
            ]
        })
        .collect();
    report::table(
        &format!("{scenario}: eventserver versus the bare engine, {rounds} interleaved rounds"),
        &[
            "figure",
            "eventserver",
            "floor",
            "median",
            "floor median",
            "ratio",
        ],
        &rows,
    );
    report::note("ratio: eventserver's median ÷ the floor's");
    let figures: Vec<_> = series
        .iter()
        .map(|s| {
            json!({
                "figure": s.name,
                "eventserver": s.eventserver,
                "floor": s.floor,
                "eventserver_median": median(&s.eventserver).map(thousandths),
                "floor_median": median(&s.floor).map(thousandths),
                "ratio": s.ratio().map(thousandths),
            })
        })
        .collect();
    report::json_line(json!({
        "scenario": "versus-floor",
        "compared": scenario,
        "rounds": rounds,
        "figures": figures,
    }));
}
