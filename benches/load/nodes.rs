//! The **nodes** comparison: publish and fanout, in one run, on one node on SQLite, one
//! node on PostgreSQL and N nodes on PostgreSQL (`--db postgres://… [--nodes N]`, two by
//! default), so the cost of the shared database and of spreading over nodes show side by
//! side.
//!
//! Each setup runs as processes of its own (the SQLite node too, so all three run alike),
//! fresh for every scenario run; the SQLite node gets a temporary database, the PostgreSQL
//! nodes share the one given. `--rounds R` (1 by default) repeats the three, the order
//! rotating from round to round so that drift on the machine falls on all alike, and each
//! cell is the median over the rounds. Every run prints its usual table first; then one
//! table sets the headline figures side by side ([`crate::publish`]'s events/s per write path
//! and connection count, [`crate::fanout`]'s delivery p50, p99, other-node p99 and delivered
//! %), and one JSON line (`{"scenario": "nodes", …}`) gives every value.
//!
//! On a two-core machine every process competes for the same cores: two nodes, PostgreSQL
//! and the bench together show what the extra hops cost, not how far nodes on hosts of their
//! own would scale.

use serde_json::json;

use crate::Opts;
use crate::report::{self, Figure, median, number, thousandths};
use crate::target::Source;

/// The scenarios compared.
const SCENARIOS: [&str; 2] = ["publish", "fanout"];

/// One configuration of servers.
struct Setup {
    name: String,
    postgres: Option<String>,
    nodes: usize,
}

impl Setup {
    /// The three setups: SQLite, PostgreSQL, and `nodes` nodes on PostgreSQL.
    fn all(opts: &Opts) -> Result<Vec<Setup>, String> {
        let Source::Own {
            postgres: Some(url),
            nodes,
            ..
        } = &opts.source
        else {
            return Err("nodes needs --db postgres://… and servers the bench starts".into());
        };
        let pg = |nodes: usize| Setup {
            name: format!("postgres x{nodes}"),
            postgres: Some(url.clone()),
            nodes,
        };
        Ok(vec![
            Setup {
                name: "sqlite x1".into(),
                postgres: None,
                nodes: 1,
            },
            pg(1),
            pg(*nodes),
        ])
    }

    /// `opts` for one run of this setup in `round`, with streams and categories of its own.
    fn opts(&self, opts: &Opts, at: usize, round: usize) -> Opts {
        let mut opts = opts.clone();
        opts.run_id = format!("{}-{round}{at}", opts.run_id);
        if let Source::Own {
            own_process,
            postgres,
            nodes,
            ..
        } = &mut opts.source
        {
            *own_process = true;
            *postgres = self.postgres.clone();
            *nodes = self.nodes;
        }
        opts
    }
}

/// One figure's values over the rounds, per setup.
struct Series {
    name: String,
    values: Vec<Vec<f64>>,
}

/// Runs publish and fanout on every setup, `rounds` times, and prints the comparison.
pub fn compare(opts: &Opts, rounds: usize, nofile: u64) -> Result<(), String> {
    let setups = Setup::all(opts)?;
    let mut series: Vec<Series> = Vec::new();
    for round in 0..rounds {
        for step in 0..setups.len() {
            let at = (step + round) % setups.len();
            let setup = &setups[at];
            for scenario in SCENARIOS {
                eprintln!(
                    "load: nodes: round {}/{rounds}, {scenario} on {}",
                    round + 1,
                    setup.name
                );
                let run = setup.opts(opts, at, round);
                for Figure { name, value } in crate::run_scenario(&run, scenario, nofile)? {
                    let found = series.iter().position(|s| s.name == name);
                    let s = match found {
                        Some(i) => &mut series[i],
                        None => {
                            series.push(Series {
                                name,
                                values: vec![Vec::new(); setups.len()],
                            });
                            series.last_mut().expect("pushed just above")
                        }
                    };
                    s.values[at].push(value);
                }
            }
        }
    }
    print(&setups, rounds, &series);
    Ok(())
}

/// The side-by-side table and the JSON line.
fn print(setups: &[Setup], rounds: usize, series: &[Series]) {
    let rows: Vec<Vec<String>> = series
        .iter()
        .map(|s| {
            let mut row = vec![s.name.clone()];
            row.extend(
                s.values
                    .iter()
                    .map(|v| median(v).map_or("-".into(), number)),
            );
            row
        })
        .collect();
    let mut header = vec!["figure"];
    header.extend(setups.iter().map(|s| s.name.as_str()));
    report::table(
        &format!(
            "one node on SQLite, one and {} on PostgreSQL ({rounds} round{}, medians)",
            setups.last().map_or(0, |s| s.nodes),
            if rounds == 1 { "" } else { "s" }
        ),
        &header,
        &rows,
    );
    report::note(&format!(
        "load average now {}; every process shares this machine's cores",
        crate::load_average()
    ));
    let figures: Vec<_> = series
        .iter()
        .map(|s| {
            let per_setup: serde_json::Map<_, _> = setups
                .iter()
                .zip(&s.values)
                .map(|(setup, values)| {
                    (
                        setup.name.clone(),
                        json!({ "values": values, "median": median(values).map(thousandths) }),
                    )
                })
                .collect();
            json!({ "figure": s.name, "setups": per_setup })
        })
        .collect();
    report::json_line(json!({ "scenario": "nodes", "rounds": rounds, "figures": figures }));
}
