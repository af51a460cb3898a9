//! `chctl bench compare`: the read-side modes side by side, from the JSON of `trade-flow` runs.
//! Runs are grouped by load (fsync setting, sizes, clients, rates, seed); in each group a
//! column per mode (the median of its runs), and, where `adaptive` ran beside fixed batching
//! (`eventual`, `batch`), adaptive's figures over the best of the fixed ones for that load
//! (issue 3: adaptive should never be much worse than the best fixed setting). `immediate` is
//! listed, not compared: its replies wait for the read model, a different contract.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{at, cell, Better, FIGURES};

#[derive(clap::Args, Debug)]
pub struct Compare {
    /// Result files of `chctl bench trade-flow` (e.g. those `make bench-modes` wrote).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// The modes whose batching is fixed, compared with `adaptive`.
const FIXED: [&str; 2] = ["eventual", "batch"];

struct Run {
    mode: String,
    report: Value,
}

/// The load a run was measured under, for the group's heading.
fn describe(r: &Value) -> String {
    let c = &r["config"];
    let rate = |key: &str| match c[key].as_u64() {
        Some(n) => format!(" at {n}/s"),
        None => " (closed loop)".to_owned(),
    };
    format!(
        "JetStream sync_interval {}; {} signals from {} clients{}, {} query clients{}; {} portfolios, seed {}",
        r["env"]["jetstream_sync_interval"].as_str().unwrap_or("?"),
        c["signals"],
        c["clients"],
        rate("rate"),
        c["query_clients"],
        rate("query_rate"),
        c["portfolios"],
        c["seed"],
    )
}

fn group_key(r: &Value) -> String {
    let mut key = r["env"]["jetstream_sync_interval"].to_string();
    // A load: the workload and the batch bound; runs differing in one of them are not
    // compared.
    for k in super::WORKLOAD_KEYS.into_iter().chain(["ch_batch_max"]) {
        key.push('|');
        key.push_str(&r["config"][k].to_string());
    }
    key
}

fn read(path: &Path) -> Result<Run> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mode = report["config"]["ch_sync"]
        .as_str()
        .with_context(|| {
            format!(
                "{}: no config.ch_sync (not a trade-flow result)",
                path.display()
            )
        })?
        .to_owned();
    Ok(Run { mode, report })
}

/// The median of the numbers among `values` (`None` if there is none).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// A figure's value in a run, as a number (`sync_overhead` may be an object with a reason).
fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v["value"].as_f64())
}

/// The modes of `runs`, in the order they first appear.
fn modes<'a>(runs: &[&'a Run]) -> Vec<&'a str> {
    let mut modes: Vec<&str> = Vec::new();
    for r in runs {
        if !modes.contains(&r.mode.as_str()) {
            modes.push(&r.mode);
        }
    }
    modes
}

/// A figure's median over the runs of each mode, in the order of [`modes`].
fn medians(runs: &[&Run], path: &[&str]) -> Vec<(String, Option<f64>)> {
    modes(runs)
        .into_iter()
        .map(|mode| {
            let values = runs
                .iter()
                .filter(|r| r.mode == mode)
                .filter_map(|r| number(at(&r.report, path)))
                .collect();
            (mode.to_owned(), median(values))
        })
        .collect()
}

/// A median as the report would hold it: a whole number (a count) as an integer.
fn as_json(v: Option<f64>) -> Value {
    match v {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => Value::from(x as i64),
        Some(x) => Value::from(x),
        None => Value::Null,
    }
}

/// Adaptive's figure over the best fixed one, from the modes' medians, the best of the fixed
/// modes by the figure's direction. `None` when either side has no number, the best is zero,
/// or the figure is better neither way.
fn adaptive_over_best(medians: &[(String, Option<f64>)], better: Better) -> Option<f64> {
    let of = |mode: &str| {
        medians
            .iter()
            .find(|(m, _)| m == mode)
            .and_then(|(_, v)| *v)
    };
    let adaptive = of("adaptive")?;
    let fixed = FIXED.iter().filter_map(|m| of(m));
    let best = match better {
        Better::Higher => fixed.reduce(f64::max),
        Better::Lower => fixed.reduce(f64::min),
        Better::Neither => None,
    }?;
    (best != 0.0).then(|| adaptive / best)
}

/// The comparison as text: a table per load, a column per mode (the median of its runs).
fn render(runs: &[Run]) -> String {
    let mut groups: Vec<(String, Vec<&Run>)> = Vec::new();
    for r in runs {
        let key = group_key(&r.report);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let mut out = String::new();
    for (_, group) in &groups {
        let compared = group.iter().any(|r| r.mode == "adaptive")
            && group.iter().any(|r| FIXED.contains(&r.mode.as_str()));
        let modes = modes(group);
        out.push_str(&format!(
            "\n{}\n{:<24}",
            describe(&group[0].report),
            "figure"
        ));
        for mode in &modes {
            out.push_str(&format!(" {mode:>11}"));
        }
        if compared {
            out.push_str("  adaptive / best fixed");
        }
        out.push_str(&format!("\n{:<24}", "runs"));
        for mode in &modes {
            let n = group.iter().filter(|r| r.mode == *mode).count();
            out.push_str(&format!(" {n:>11}"));
        }
        out.push('\n');
        for figure in &FIGURES {
            let row = medians(group, figure.path);
            out.push_str(&format!("{:<24}", figure.name));
            for (_, v) in &row {
                out.push_str(&format!(" {:>11}", cell(&as_json(*v))));
            }
            if compared {
                let ratio = adaptive_over_best(&row, figure.better);
                if let Some(x) = ratio {
                    out.push_str(&format!("  {x:>10.2}"));
                }
            }
            out.push('\n');
        }
    }
    if groups
        .iter()
        .any(|(_, g)| g.iter().any(|r| r.mode == "adaptive"))
    {
        out.push_str(
            "\n(each figure the median of the mode's runs; adaptive / best fixed: adaptive's \
             over the better of eventual's and batch's, above 1 being more for commands/s, \
             queries/s and rebuild events/s, and worse for the others)\n",
        );
    }
    out
}

pub fn run(a: &Compare) -> Result<ExitCode> {
    let runs = a
        .files
        .iter()
        .map(|f| read(f))
        .collect::<Result<Vec<_>>>()?;
    print!("{}", render(&runs));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(mode: &str, rate: Option<u32>, cmds: f64, lag_p99: f64) -> Run {
        Run {
            mode: mode.to_owned(),
            report: json!({
                "config": {"ch_sync": mode, "seed": 42, "portfolios": 10, "strategies": 2,
                           "signals": 100, "clients": 4, "query_clients": 1, "rate": rate,
                           "query_rate": null, "ch_batch_max": 500},
                "env": {"jetstream_sync_interval": "default"},
                "commands_per_sec": cmds,
                "rejected_share": 0.07,
                "projection_lag_ms": {"p50": 1.0, "p99": lag_p99},
                "sync_overhead": {"value": null, "why": "no pids"},
            }),
        }
    }

    #[test]
    fn adaptive_is_set_against_the_best_fixed_mode_of_its_load() {
        let runs = [
            run("eventual", None, 1000.0, 40.0),
            run("batch", None, 1200.0, 80.0),
            run("adaptive", None, 900.0, 60.0),
            run("adaptive", None, 1100.0, 20.0),
            run("immediate", None, 5000.0, 1.0),
            // Another load: not mixed into the one above.
            run("adaptive", Some(500), 500.0, 2.0),
        ];
        let refs: Vec<&Run> = runs[..5].iter().collect();
        let cmds = medians(&refs, &["commands_per_sec"]);
        let modes: Vec<&str> = cmds.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(modes, ["eventual", "batch", "adaptive", "immediate"]);
        assert_eq!(cmds[2].1, Some(1000.0));
        // Higher is better: adaptive's median (1000) over batch's 1200.
        let r = adaptive_over_best(&cmds, Better::Higher).unwrap();
        assert!((r - 1000.0 / 1200.0).abs() < 1e-9, "{r}");
        // Lower is better: adaptive's median 40 over eventual's 40; immediate is not fixed
        // batching and does not count.
        let lag = medians(&refs, &["projection_lag_ms", "p99"]);
        assert!((adaptive_over_best(&lag, Better::Lower).unwrap() - 1.0).abs() < 1e-9);
        // No numbers on either side: no ratio.
        assert_eq!(
            adaptive_over_best(&medians(&refs, &["sync_overhead"]), Better::Lower),
            None
        );

        let text = render(&runs);
        assert_eq!(
            text.matches("JetStream sync_interval default").count(),
            2,
            "{text}"
        );
        assert!(text.contains("at 500/s"), "{text}");
        assert!(text.contains("(closed loop)"), "{text}");
        let row = |name: &str| -> Vec<&str> {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .split_whitespace()
                .collect()
        };
        assert_eq!(row("runs")[1..], ["1", "1", "2", "1"]);
        assert_eq!(
            row("commands/s")[1..],
            ["1000", "1200", "1000", "5000", "0.83"]
        );
        // eventual, batch, adaptive (the median of 60 and 20), immediate; then adaptive / best.
        let lag_row = row("projection lag p99 ms");
        assert_eq!(lag_row[4..], ["40", "80", "40", "1", "1.00"]);
        // Neither better higher nor lower (the workload sets it): no ratio.
        assert_eq!(row("rejected share")[2..], ["0.070"; 4]);
        // The second load has adaptive only: no comparison column there.
        let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("figure")).collect();
        assert_eq!(headers.len(), 2, "{text}");
        assert!(
            headers[0].ends_with("adaptive / best fixed"),
            "{}",
            headers[0]
        );
        assert!(!headers[1].contains("best fixed"), "{}", headers[1]);
    }

    #[test]
    fn medians_of_even_and_odd_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
