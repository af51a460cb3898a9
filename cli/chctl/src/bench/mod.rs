//! `chctl bench trade-flow`: the benchmark of issue 3. A deterministic trade-flow workload
//! (strategies, funded portfolios, then trade signals from closed-loop or paced clients while
//! other clients query portfolios) against a deployment, over NATS only, like any client; then the
//! stream is folded and compared with the read model, and the portfolio read model is rebuilt.
//! With `--baseline monolith` the same workload runs against the monolithic baseline
//! ([`monolith`]) in this process, and the report gives ours / baseline for every figure.
//!
//! Output: a progress bar, a table, and `<out>/<UTC timestamp>.json` (`<timestamp>-<tag>.json`
//! with `--tag`) plus `<out>/latest.json`.

mod check;
mod compare;
mod load;
pub mod monolith;
mod served;
mod sys;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio_util::sync::CancellationToken;

use crate::common::{redact, Ctx};
use load::{percentiles, round3, share, LagTracker, Target};
use workload::{Sizes, Workload};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(clap::Subcommand)]
pub enum Which {
    /// Strategies, funded portfolios, then trade signals from closed-loop (or paced) clients
    /// while others query portfolios; fold-and-compare, rebuild; optionally the monolithic
    /// baseline.
    TradeFlow(Box<TradeFlow>),
    /// The read-side modes side by side from `trade-flow` result files, grouped by load, with
    /// `adaptive` against the best fixed batching of each load.
    Compare(compare::Compare),
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Baseline {
    /// The same workload against the monolithic baseline, in this process.
    Monolith,
    /// CipherHorizon only.
    None,
}

#[derive(clap::Args, Debug)]
pub struct TradeFlow {
    /// Seed of the workload (same seed, same requests).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Portfolios (opened, funded, attached to a strategy) [default: 1000; --quick: 50].
    #[arg(long, value_parser = at_least_one())]
    pub portfolios: Option<usize>,
    /// Strategies, attached round-robin [default: 100; --quick: 10].
    #[arg(long, value_parser = at_least_one())]
    pub strategies: Option<usize>,
    /// `signal.execute` requests [default: 100000; --quick: 2000].
    #[arg(long, value_parser = at_least_one())]
    pub signals: Option<usize>,
    /// Concurrent closed-loop signal clients [default: 32; --quick: 8].
    #[arg(long, value_parser = at_least_one())]
    pub clients: Option<usize>,
    /// Concurrent closed-loop query clients [default: 8; --quick: 2].
    #[arg(long)]
    pub query_clients: Option<usize>,
    /// Signals per second in all, the signal clients paced to share it (each waits for its
    /// slot; one behind its schedule sends at once): the offered load, as long as the
    /// deployment keeps up [default: none, closed loop: as fast as the replies come].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: Option<u32>,
    /// Queries per second in all, shared by the query clients likewise [default: closed loop].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub query_rate: Option<u32>,
    /// A smoke-test size (explicit sizes still win).
    #[arg(long)]
    pub quick: bool,
    /// Also run the monolithic baseline on the same workload.
    #[arg(long, value_enum, default_value_t = Baseline::Monolith)]
    pub baseline: Baseline,
    /// Take the monolithic baseline from an earlier result file of the same workload instead
    /// of running it again (the report names the file). The monolith uses no JetStream, so
    /// its figures do not depend on the server's fsync setting: `make bench` runs it beside
    /// the default-fsync run and takes it from there for `always`.
    #[arg(long, value_name = "FILE", conflicts_with = "baseline")]
    pub baseline_from: Option<PathBuf>,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// JetStream `sync_interval` of the server, for the report (the server does not tell
    /// clients; its monitoring port does, where `make bench` reads it); e.g. `default` or
    /// `always`.
    #[arg(long)]
    pub sync_interval_label: Option<String>,
    /// Prefix of every id of this run [default: `b` and the time in base 36], so that runs
    /// never collide on one deployment.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Added to the result file's name: `<timestamp>-<tag>.json`.
    #[arg(long, value_parser = file_name_part)]
    pub tag: Option<String>,
    /// Concurrency of the (unmeasured) set-up.
    #[arg(long, default_value_t = 64, value_parser = at_least_one())]
    pub setup_concurrency: usize,
}

/// A count of at least one (none would make a run that measures nothing).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

impl TradeFlow {
    fn sizes(&self) -> (Sizes, usize) {
        let (p, s, n, c, q) = if self.quick {
            (50, 10, 2000, 8, 2)
        } else {
            (1000, 100, 100_000, 32, 8)
        };
        (
            Sizes {
                seed: self.seed,
                portfolios: self.portfolios.unwrap_or(p),
                strategies: self.strategies.unwrap_or(s).max(1),
                signals: self.signals.unwrap_or(n),
                clients: self.clients.unwrap_or(c).max(1),
            },
            self.query_clients.unwrap_or(q),
        )
    }

    fn rates(&self) -> load::Rates {
        load::Rates {
            signals: self.rate,
            queries: self.query_rate,
        }
    }

    fn clients(&self, query_clients: usize) -> Clients {
        Clients {
            query_clients,
            rates: self.rates(),
            setup_concurrency: self.setup_concurrency.max(1),
        }
    }
}

/// How the clients of one run load the deployment: the query clients, closed loop or paced,
/// and the concurrency of the (unmeasured) set-up.
#[derive(Debug, Clone, Copy)]
struct Clients {
    query_clients: usize,
    rates: load::Rates,
    setup_concurrency: usize,
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<ExitCode> {
    match &args.which {
        Which::TradeFlow(a) => trade_flow(ctx, a).await,
        Which::Compare(a) => compare::run(a),
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

async fn trade_flow(ctx: &Ctx, a: &TradeFlow) -> Result<ExitCode> {
    let started_at = chrono::Utc::now();
    let (sizes, query_clients) = a.sizes();
    let run_id = match &a.run_id {
        Some(r) => {
            ch_domain::ids::validate_id("--run-id", r).map_err(|e| anyhow::anyhow!("{e}"))?;
            r.clone()
        }
        None => format!("b{}", base36(started_at.timestamp_millis() as u64)),
    };
    // Where the results go, tried before the run rather than found unwritable after it.
    writable(&a.out)?;
    let t0 = Instant::now();
    let w = Workload::generate(sizes, &run_id);
    let per_sec = |rate: Option<u32>| rate.map_or(String::new(), |r| format!(" at {r}/s"));
    println!(
        "trade-flow: seed {}, {} portfolios, {} strategies, {} signals from {} clients{}, {} query clients{}; run id {run_id} (generated in {:.2} s)",
        sizes.seed,
        sizes.portfolios,
        sizes.strategies,
        sizes.signals,
        sizes.clients,
        per_sec(a.rate),
        query_clients,
        per_sec(a.query_rate),
        t0.elapsed().as_secs_f64()
    );
    let mut config = config(ctx, a, sizes, query_clients, &w);
    // Read before the run: a file of another workload fails it at once.
    let earlier_baseline = match &a.baseline_from {
        Some(file) => Some(baseline_from(file, &config)?),
        None => None,
    };
    let client = ctx.connect().await?;
    with_deployment(&mut config, &deployment(ctx, &client).await);
    let env = environment(ctx, &client, a).await;
    let sync = &env["sync_write_ms"];
    println!(
        "host: {} CPUs ({}); {}",
        env["cpus"],
        env["cpu_model"].as_str().unwrap_or("?"),
        match sync["error"].as_str() {
            None => format!(
                "a synced 4 KiB write in {} ms (p50; p90 {}) in {}",
                sync["p50"],
                sync["p90"],
                sync["dir"].as_str().unwrap_or("?")
            ),
            Some(e) => format!("a synced write could not be timed: {e}"),
        }
    );
    let ids: Vec<String> = w.portfolios.iter().map(|p| p.id.clone()).collect();

    println!(
        "\n== CipherHorizon (prefix {}, CH_SYNC={}, NATS {})",
        ctx.subjects.prefix(),
        config["ch_sync"].as_str().unwrap_or("?"),
        crate::common::redact(&ctx.cfg.nats_url)
    );
    let (ours, folded) =
        run_ours(ctx, &client, &w, a.clients(query_clients), &ids, &run_id).await?;

    let baseline = match (earlier_baseline, a.baseline) {
        (Some(earlier), _) => {
            println!(
                "\n== monolithic baseline: from {} (run {}, started {}), the same workload",
                earlier["from"]["file"].as_str().unwrap_or_default(),
                earlier["from"]["run_id"].as_str().unwrap_or_default(),
                earlier["from"]["started_at"].as_str().unwrap_or_default()
            );
            Some(earlier)
        }
        (None, Baseline::Monolith) => {
            let prefix = format!("{}mono", ctx.subjects.prefix());
            let schema = format!("{}_mono", ctx.cfg.db_schema);
            println!(
                "\n== monolithic baseline (prefix {prefix}, schema {schema}, in this process)"
            );
            Some(
                run_monolith(
                    ctx,
                    &client,
                    &w,
                    a.clients(query_clients),
                    &ids,
                    &folded,
                    &prefix,
                    &schema,
                )
                .await?,
            )
        }
        (None, Baseline::None) => None,
    };

    let ratio = baseline
        .as_ref()
        .map(|b| ratios(&ours, b))
        .unwrap_or(Value::Null);
    let mut report = json!({
        "benchmark": "trade-flow",
        "started_at": started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "finished_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "run_id": run_id,
        "config": config,
        "env": env,
    });
    if let (Value::Object(r), Value::Object(o)) = (&mut report, &ours) {
        r.extend(o.clone());
    }
    report["baseline"] = baseline.clone().unwrap_or(Value::Null);
    report["ratio"] = ratio.clone();
    if report["baseline"].is_object() {
        // What "acknowledged" means on each side: the ratios compare both as configured.
        report["ratio"]["durability"] = json!(
            "ours: an append is acknowledged as env.jetstream_sync_interval says (default: \
             before its fsync; always: after it); the baseline: a commit returns as \
             env.postgres_synchronous_commit says (on: after its WAL flush), or \
             baseline.from.env's for a baseline from an earlier run"
        );
    }
    if let Some(from) = report["baseline"].get("from").cloned() {
        // The divisor of every ratio came from that run.
        report["ratio"]["baseline_from"] = from["run_id"].clone();
    }

    print_table(&report, a.sync_interval_label.as_deref());
    let path = write(&a.out, a.tag.as_deref(), &report, started_at)?;
    println!(
        "\nresults: {} (and {})",
        path.display(),
        a.out.join("latest.json").display()
    );
    let failures = failures(&report);
    for f in &failures {
        eprintln!("{f}");
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What makes a run fail, whose JSON is written all the same: read-model rows that differ from
/// the stream, a failed rebuild, failed requests (ours or the baseline's).
fn failures(report: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let differing = report["consistency"]["rows_differing"]
        .as_u64()
        .unwrap_or(1)
        + report["consistency"]["rows_differing_after_rebuild"]
            .as_u64()
            .unwrap_or(0);
    if differing > 0 {
        out.push("read-model rows differ from the stream: see \"consistency\" in the JSON".into());
    }
    if let Some(e) = report["rebuild"]["error"].as_str() {
        out.push(format!(
            "the rebuild failed ({e}): its figures are missing from the JSON"
        ));
    }
    let failed = |r: &Value| r["errors"]["total"].as_u64().unwrap_or(0);
    let (ours, baseline) = (failed(report), failed(&report["baseline"]));
    if ours + baseline > 0 {
        out.push(format!(
            "requests failed: {ours} of CipherHorizon's, {baseline} of the baseline's (see \"errors\" \
             in the JSON; their latencies are left out of the percentiles)"
        ));
    }
    out
}

async fn environment(ctx: &Ctx, client: &async_nats::Client, a: &TradeFlow) -> Value {
    let info = client.server_info();
    // The server's version, and the commit setting the monolith's transactions run with (the
    // projectors turn the WAL flush off for their own).
    let (pg_version, pg_commit) = match ch_runtime::pg::connect(&ctx.cfg.database_url, None).await {
        Ok(c) => {
            let show = |what: &'static str| {
                let c = &c;
                async move {
                    c.query_one(&format!("SHOW {what}"), &[])
                        .await
                        .ok()
                        .map(|r| r.get::<_, String>(0))
                }
            };
            (
                show("server_version").await,
                show("synchronous_commit").await,
            )
        }
        Err(_) => (None, None),
    };
    let mut env = sys::machine();
    env["nats_server_version"] = json!(info.version);
    env["nats_server_name"] = json!(info.server_name);
    env["jetstream_sync_interval"] = json!(a.sync_interval_label);
    env["postgres_version"] = json!(pg_version);
    env["postgres_synchronous_commit"] = json!(pg_commit);
    let dir = std::env::temp_dir();
    env["sync_write_ms"] = tokio::task::spawn_blocking(move || sys::sync_write_ms(&dir, 200))
        .await
        .unwrap_or_else(|e| json!({ "error": e.to_string() }));
    env
}

/// The configuration keys that make two runs the same workload (`bench compare` groups runs
/// by them too).
pub(crate) const WORKLOAD_KEYS: [&str; 8] = [
    "seed",
    "portfolios",
    "strategies",
    "signals",
    "clients",
    "query_clients",
    "rate",
    "query_rate",
];

/// The `baseline` of an earlier result file, if it ran the same workload as `config`; it
/// gains `from` (the file, its run id and start).
fn baseline_from(file: &Path, config: &Value) -> Result<Value> {
    let text =
        std::fs::read(file).with_context(|| format!("--baseline-from {}", file.display()))?;
    let earlier: Value = serde_json::from_slice(&text)
        .with_context(|| format!("--baseline-from {}: not JSON", file.display()))?;
    // The requests generated from them, too (another version may generate others).
    for k in WORKLOAD_KEYS
        .into_iter()
        .chain(["signals_meant_to_be_rejected"])
    {
        let (there, here) = (&earlier["config"][k], &config[k]);
        anyhow::ensure!(
            there == here,
            "--baseline-from {}: {k} is {there} there and {here} here: not the same workload",
            file.display()
        );
    }
    let mut baseline = earlier["baseline"].clone();
    anyhow::ensure!(
        baseline.is_object(),
        "--baseline-from {}: it has no baseline",
        file.display()
    );
    // A baseline that file took from another keeps that one's origin.
    if baseline.get("from").is_some() {
        return Ok(baseline);
    }
    // Where and on what it was measured: its run's commit, host and disk, not this one's.
    baseline["from"] = json!({
        "file": file.display().to_string(),
        "run_id": earlier["run_id"],
        "started_at": earlier["started_at"],
        "env": earlier["env"],
    });
    // Its consistency check was against that run's stream, not this one's.
    if let Some(c) = baseline
        .get_mut("consistency")
        .and_then(Value::as_object_mut)
    {
        c.insert(
            "compared_with".into(),
            json!(format!(
                "the portfolios folded from CipherHorizon's stream of run {} ({}), same workload",
                earlier["run_id"].as_str().unwrap_or("?"),
                file.display()
            )),
        );
    }
    Ok(baseline)
}

fn config(ctx: &Ctx, a: &TradeFlow, s: Sizes, query_clients: usize, w: &Workload) -> Value {
    let c = &ctx.cfg;
    json!({
        "seed": s.seed,
        "portfolios": s.portfolios,
        "strategies": s.strategies,
        "signals": s.signals,
        "clients": s.clients,
        "query_clients": query_clients,
        "rate": a.rate,
        "query_rate": a.query_rate,
        "quick": a.quick,
        "baseline": match (a.baseline, &a.baseline_from) {
            // Not measured in this run: `baseline.from` says where.
            (_, Some(_)) => "monolith, from an earlier run",
            (Baseline::Monolith, None) => "monolith",
            (Baseline::None, None) => "none",
        },
        "baseline_from": a.baseline_from.as_ref().map(|f| f.display().to_string()),
        // How the monolith runs here: its CPU is the load generator's (`chctl-bench`).
        "monolith": (a.baseline == Baseline::Monolith && a.baseline_from.is_none()).then(|| json!({
            "process": "the benchmark's own, on its runtime (chctl_worker_threads)",
            "postgres_pool": monolith::POOL_SIZE})),
        // The load generator's (and the monolith's) runtime; `ch_worker_threads` becomes the
        // workers' (see `with_deployment`).
        "chctl_worker_threads": c.worker_threads,
        "setup_concurrency": a.setup_concurrency,
        "signals_meant_to_be_rejected": w.intended_rejections,
        "pairs": workload::PAIRS.iter().map(|p| p.symbol).collect::<Vec<_>>(),
        "ch_sync": c.sync.as_str(),
        "ch_batch_max": c.batch_max,
        "ch_batch_wait_ms": c.batch_wait.as_millis() as u64,
        "ch_replay_batch_max": c.replay_batch_max,
        "ch_immediate_timeout_ms": c.immediate_timeout.as_millis() as u64,
        "ch_db_pool": c.db_pool_size,
        "ch_worker_threads": c.worker_threads,
        "ch_subject_prefix": c.prefix,
        "ch_db_schema": c.db_schema,
        "ch_nats_url": redact(&c.nats_url),
        "ch_database_url": redact(&c.database_url),
        "tag": a.tag,
    })
}

/// The services the figures depend on, and the `CH_*` keys each one's metadata settles: the
/// signal command's path (`immediate` waits there) and the portfolio projector (batching).
const DEPLOYMENT_KEYS: [(&str, &[&str]); 2] = [
    (
        "cmd-signal",
        &["ch_sync", "ch_immediate_timeout_ms", "ch_worker_threads"],
    ),
    (
        "proj-portfolio",
        &[
            "ch_sync",
            "ch_batch_max",
            "ch_batch_wait_ms",
            "ch_replay_batch_max",
            "ch_db_pool",
            "ch_worker_threads",
        ],
    ),
];

/// What the deployment's workers say of their configuration: each service's distinct
/// `$SRV.INFO` metadata (`Config::service_metadata`) over its instances.
async fn deployment(ctx: &Ctx, client: &async_nats::Client) -> Value {
    let mut services = serde_json::Map::new();
    for (service, _) in DEPLOYMENT_KEYS {
        let mut seen: Vec<Value> = Vec::new();
        let infos = crate::common::info(client, &ctx.subjects.service_name(service)).await;
        for info in infos.unwrap_or_default() {
            if !seen.contains(&info["metadata"]) {
                seen.push(info["metadata"].clone());
            }
        }
        services.insert(service.into(), Value::Array(seen));
    }
    Value::Object(services)
}

/// Sets `config`'s `CH_*` keys from what the deployment reports (a benchmark run by hand
/// against a deployment knows nothing else of it): each from the services that settle it,
/// `"mixed"` where their instances differ; a key none reports (workers older than their
/// metadata) keeps this process's environment's value, and `ch_from_environment` names it.
fn with_deployment(config: &mut Value, deployment: &Value) {
    let mut from_env = BTreeSet::new();
    let mut reported: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (service, keys) in DEPLOYMENT_KEYS {
        for key in keys {
            let values = reported.entry(key).or_default();
            for m in deployment[service].as_array().into_iter().flatten() {
                values.extend(m[key].as_str().map(str::to_owned));
            }
        }
    }
    for (key, values) in reported {
        let mut values = values.into_iter();
        config[key] = match (values.next(), values.next()) {
            (None, _) => {
                from_env.insert(key);
                continue;
            }
            (Some(v), None) => v.parse::<u64>().map_or_else(|_| json!(v), |n| json!(n)),
            (Some(_), Some(_)) => json!("mixed"),
        };
    }
    config["ch_from_environment"] = json!(from_env);
    config["deployment"] = deployment.clone();
}

/// CPU seconds of the signal phase that `sync_overhead` weighs: the projector processes, the
/// Postgres sessions they write through, and the command worker processes.
struct OverheadParts {
    projectors: f64,
    projectors_postgres: f64,
    commands: f64,
}

fn sync_overhead_parts(cpu: &sys::CpuUse, ctx: &Ctx) -> OverheadParts {
    let sum = |m: &BTreeMap<String, f64>, pred: &dyn Fn(&str) -> bool| -> f64 {
        m.iter().filter(|(k, _)| pred(k)).map(|(_, v)| v).sum()
    };
    let sessions = format!("{}-proj-", ctx.subjects.prefix());
    OverheadParts {
        projectors: sum(&cpu.processes, &|k| k.starts_with("proj-")),
        projectors_postgres: sum(&cpu.postgres_by_application, &|k| k.starts_with(&sessions)),
        commands: sum(&cpu.processes, &|k| k.starts_with("cmd-")),
    }
}

/// `projectors / commands` to four places, or why there is none.
fn overhead(projectors: f64, commands: f64) -> Value {
    if commands > 0.0 {
        json!((projectors / commands * 10000.0).round() / 10000.0)
    } else {
        json!({"value": null, "why": "the command workers used no measurable CPU"})
    }
}

/// `sync_overhead` with the projectors' Postgres sessions counted on their side: the writes of
/// the read model, which the projector processes' own CPU leaves out.
fn with_postgres(p: &OverheadParts) -> Value {
    overhead(p.projectors + p.projectors_postgres, p.commands)
}

/// The figures of one side (ours or the baseline) of a run.
#[allow(clippy::too_many_arguments)]
fn figures(
    setup: &load::Setup,
    phase: &load::Phase,
    lag: Value,
    sync_overhead: Value,
    rebuild: &Value,
    cpu: &sys::CpuUse,
    consistency: Value,
) -> Value {
    let answered = phase.executed + phase.rejected;
    let secs = phase.seconds.max(1e-9);
    let queries_answered = phase
        .queries
        .saturating_sub(phase.query_errors.values().sum::<u64>());
    json!({
        // Answered (executed or rejected by a risk check); errors are counted apart.
        "commands_per_sec": (answered as f64 / secs).round(),
        "command_latency_ms": percentiles(&phase.command_latency, &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]),
        "query_latency_ms": percentiles(&phase.query_latency, &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]),
        "queries_per_sec": (queries_answered as f64 / secs).round(),
        "projection_lag_ms": lag,
        "sync_overhead": sync_overhead,
        "rebuild_events_per_sec": rebuild.get("events_per_sec").cloned().unwrap_or(Value::Null),
        "rejected_share": share(phase.rejected, answered).map(|x| (x * 10000.0).round() / 10000.0),
        "errors": {
            "commands": phase.command_errors,
            "queries": phase.query_errors,
            "total": phase.command_errors.values().sum::<u64>() + phase.query_errors.values().sum::<u64>(),
        },
        "consistency": consistency,
        "signals": {
            "sent": phase.commands,
            "executed": phase.executed,
            "rejected": phase.rejected,
            "rejections_by_reason": phase.rejections,
            "seconds": round3(phase.seconds),
            "last_stream_seq": phase.last_seq,
        },
        "queries": phase.queries,
        "setup": {"commands": setup.commands, "seconds": round3(setup.seconds)},
        "rebuild": rebuild,
        "cpu_seconds": rounded(&cpu.processes),
        "postgres_cpu_seconds_by_application": rounded(&cpu.postgres_by_application),
    })
}

/// CPU seconds by name, in milliseconds' precision.
fn rounded(seconds: &std::collections::BTreeMap<String, f64>) -> Value {
    seconds
        .iter()
        .map(|(k, v)| (k.clone(), json!(round3(*v))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The processes whose CPU a run measures: the workers `chctl up` started for this run dir,
/// Postgres' processes but other databases' backends, by the sessions they serve, and the
/// local nats-server on the run's port.
fn watched(ctx: &Ctx) -> sys::Watched {
    sys::Watched::from_pid_file(&ctx.pid_file())
        .with_database(&ctx.cfg.database_url)
        .with_nats(&ctx.cfg.nats_url)
}

async fn run_ours(
    ctx: &Ctx,
    client: &async_nats::Client,
    w: &Workload,
    clients: Clients,
    ids: &[String],
    run_id: &str,
) -> Result<(Value, Folded)> {
    let target = Target {
        client: client.clone(),
        prefix: ctx.subjects.prefix().to_owned(),
    };
    let watched = watched(ctx);
    // Before the set-up, whose reads (waiting for its last portfolio) count as the run's.
    let served_before = served::requests(client, &ctx.subjects).await;
    let setup = load::setup(&target, w, clients.setup_concurrency).await?;
    println!(
        "set-up: {} commands in {:.2} s",
        setup.commands, setup.seconds
    );
    if let Some(last) = ids.last() {
        load::wait_visible(&target, last, setup.last_seq, Duration::from_secs(60)).await?;
    }
    let lag = LagTracker::start(client, ctx.subjects.progress("portfolio")).await?;
    let before = watched.snapshot().await;
    let phase = load::run(
        &target,
        w,
        clients.query_clients,
        clients.rates,
        w.seed,
        Some(lag.clone()),
        "CipherHorizon",
    )
    .await;
    // The projector's work on this phase ends when it has applied the last reply's event.
    let drain_started = Instant::now();
    let (hist, samples, unresolved) = lag.finish(Duration::from_secs(60)).await;
    if let Some(last) = ids.last() {
        if let Err(e) =
            load::wait_visible(&target, last, phase.last_seq, Duration::from_secs(60)).await
        {
            eprintln!("warning: {e:#}");
        }
    }
    let drain = drain_started.elapsed().as_secs_f64();
    let after = watched.snapshot().await;
    let cpu = sys::cpu_seconds(&before, &after);
    // Before the consistency check, whose queries would count too.
    let served = served::latency(client, &ctx.subjects, &served_before).await;
    println!(
        "signals: {} in {:.2} s; read model caught up {:.3} s after the last reply",
        phase.commands, phase.seconds, drain
    );
    if let Some(line) = cpu.postgres_line() {
        println!("{line}");
    }

    let mut lag_json = percentiles(&hist, &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]);
    if lag_json.is_null() {
        // No sample at all (no reply carried a `stream_seq`): the figures are null, the
        // counts say why.
        lag_json = json!({"p50": null, "p99": null, "p999": null, "count": 0});
    }
    if let Value::Object(m) = &mut lag_json {
        m.insert("samples".into(), json!(samples));
        m.insert("unresolved".into(), json!(unresolved));
        m.insert("last_announced_seq".into(), json!(lag.announced_seq()));
    }
    let sync_overhead = match &watched.missing {
        Some(why) => json!({"value": null, "why": why}),
        None => {
            let parts = sync_overhead_parts(&cpu, ctx);
            overhead(parts.projectors, parts.commands)
        }
    };

    println!("consistency: folding the stream");
    let (states, head) = check::fold(client, &ctx.subjects, &format!("{run_id}-p")).await?;
    let none = BTreeSet::new();
    let mut consistency = check::compare(&target, &states, ids, Some(head), &none).await;
    consistency["stream_head"] = json!(head);
    println!(
        "consistency: {} of {} portfolios differ from the stream",
        consistency["rows_differing"], consistency["portfolios_checked"]
    );

    println!("rebuild: portfolio read model from the whole stream");
    let rebuild = match check::rebuild(ctx).await {
        Ok(v) => {
            let again = check::compare(&target, &states, ids, Some(head), &none).await;
            consistency["rows_differing_after_rebuild"] = again["rows_differing"].clone();
            consistency["examples_after_rebuild"] = again["examples"].clone();
            println!(
                "rebuild: {} events in {} s; {} portfolios differ afterwards",
                v["events"], v["seconds"], again["rows_differing"]
            );
            v
        }
        Err(e) => {
            eprintln!("rebuild failed: {e:#}");
            json!({"events_per_sec": null, "error": format!("{e:#}")})
        }
    };
    let mut fig = figures(
        &setup,
        &phase,
        lag_json,
        sync_overhead,
        &rebuild,
        &cpu,
        consistency,
    );
    fig["drain_seconds"] = json!(round3(drain));
    fig["sync_overhead_with_postgres"] = with_postgres(&sync_overhead_parts(&cpu, ctx));
    fig["service_latency_ms"] = served;
    if let Some(why) = &watched.missing {
        fig["cpu_note"] = json!(why);
    }
    let failed = phase.failed_portfolios;
    Ok((fig, Folded { states, failed }))
}

/// What CipherHorizon's run leaves for the monolith's to be compared with.
struct Folded {
    /// Each portfolio's state folded from the stream.
    states: HashMap<String, check::Portfolio>,
    /// The portfolios of the signals that failed.
    failed: BTreeSet<String>,
}

#[allow(clippy::too_many_arguments)]
async fn run_monolith(
    ctx: &Ctx,
    client: &async_nats::Client,
    w: &Workload,
    clients: Clients,
    ids: &[String],
    ours: &Folded,
    prefix: &str,
    schema: &str,
) -> Result<Value> {
    // Its own connections, as a separate service would have.
    let service_client = ctx.connect().await?;
    let conns = ch_runtime::service::Connections {
        client: service_client.clone(),
        intake: ctx.connect().await?,
    };
    let stop = CancellationToken::new();
    let handle = monolith::start(conns, &ctx.cfg.database_url, schema, prefix, stop.clone())
        .await
        .context("starting the monolithic baseline")?;
    let target = Target {
        client: client.clone(),
        prefix: prefix.to_owned(),
    };
    let result = async {
        let watched = watched(ctx);
        let setup = load::setup(&target, w, clients.setup_concurrency).await?;
        println!(
            "set-up: {} commands in {:.2} s",
            setup.commands, setup.seconds
        );
        let before = watched.snapshot().await;
        let phase = load::run(
            &target,
            w,
            clients.query_clients,
            clients.rates,
            w.seed,
            None,
            "monolith",
        )
        .await;
        let after = watched.snapshot().await;
        let cpu = sys::cpu_seconds(&before, &after);
        println!("signals: {} in {:.2} s", phase.commands, phase.seconds);
        if let Some(line) = cpu.postgres_line() {
            println!("{line}");
        }
        // A portfolio with a failed signal in either run may have taken another path.
        let failed: BTreeSet<String> = ours.failed.union(&phase.failed_portfolios).cloned().collect();
        let mut consistency = check::compare(&target, &ours.states, ids, None, &failed).await;
        consistency["compared_with"] = json!("the portfolios folded from CipherHorizon's stream (same workload, same per-portfolio order)");
        println!(
            "consistency: {} of {} monolith portfolios differ from CipherHorizon's stream{}",
            consistency["rows_differing"],
            consistency["portfolios_checked"],
            match consistency["rows_differing_after_failed_commands"].as_u64() {
                Some(n) if n > 0 => format!(
                    " (and {n} of the {} whose signals failed in one of the runs)",
                    failed.len()
                ),
                _ => String::new(),
            }
        );
        let none = json!({"events_per_sec": null, "why": "the monolith has no stream to rebuild from"});
        Ok::<_, anyhow::Error>(figures(&setup, &phase, Value::Null, Value::Null, &none, &cpu, consistency))
    }
    .await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    service_client.drain().await.ok();
    result
}

/// Keys compared in `ratio` (ours / baseline).
const RATIO_KEYS: [&str; 9] = [
    "commands_per_sec",
    "command_latency_ms",
    "query_latency_ms",
    "queries_per_sec",
    "projection_lag_ms",
    "sync_overhead",
    "rebuild_events_per_sec",
    "rejected_share",
    "errors",
];

fn ratio(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            if y == 0.0 {
                Value::Null
            } else {
                json!((x / y * 1000.0).round() / 1000.0)
            }
        }
        (Value::Object(x), Value::Object(y)) => Value::Object(
            x.iter()
                .filter(|(k, _)| y.contains_key(*k) && *k != "count")
                .map(|(k, v)| (k.clone(), ratio(v, &y[k])))
                .collect(),
        ),
        _ => Value::Null,
    }
}

fn ratios(ours: &Value, base: &Value) -> Value {
    let mut m = serde_json::Map::new();
    for k in RATIO_KEYS {
        let r = if k == "errors" {
            ratio(&ours[k]["total"], &base[k]["total"])
        } else {
            ratio(&ours[k], &base[k])
        };
        m.insert(k.to_owned(), r);
    }
    Value::Object(m)
}

/// The target for a figure in a run labelled `label` (the fsync setting), if any.
fn target(label: Option<&str>, figure: &Figure) -> &'static str {
    match label {
        Some("always") => figure.target.1,
        Some(l) if l.starts_with("default") => figure.target.0,
        _ => "",
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if n.is_u64() || n.is_i64() || x.abs() >= 100.0 {
                format!("{x:.0}")
            } else if x.abs() >= 1.0 {
                format!("{x:.2}")
            } else {
                format!("{x:.3}")
            }
        }
        Value::Object(o) if o.contains_key("value") => cell(&o["value"]),
        other => other.to_string(),
    }
}

/// Which way a figure is better, for `chctl bench compare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    /// Set by the workload, not by the system (the rejected share).
    Neither,
}

/// A figure of a run's table.
struct Figure {
    name: &'static str,
    /// Where it is in the report.
    path: &'static [&'static str],
    better: Better,
    /// The targets at the default fsync and with `sync_interval: always` ("" for none).
    target: (&'static str, &'static str),
}

const fn figure(
    name: &'static str,
    path: &'static [&'static str],
    better: Better,
    target: (&'static str, &'static str),
) -> Figure {
    Figure {
        name,
        path,
        better,
        target,
    }
}

const NONE: (&str, &str) = ("", "");

/// The figures of a run's table, in its order.
#[rustfmt::skip]
const FIGURES: [Figure; 19] = {
    use Better::{Higher, Lower, Neither};
    [
        figure("commands/s", &["commands_per_sec"], Higher, (">= 10000", ">= 2500")),
        figure("command p50 ms", &["command_latency_ms", "p50"], Lower, NONE),
        figure("command p99 ms", &["command_latency_ms", "p99"], Lower, ("<= 10", "<= 40")),
        figure("command p999 ms", &["command_latency_ms", "p999"], Lower, NONE),
        figure("  p99 in the worker ms", &["service_latency_ms", "command", "p99"], Lower, NONE),
        figure("queries/s", &["queries_per_sec"], Higher, NONE),
        figure("query p50 ms", &["query_latency_ms", "p50"], Lower, NONE),
        figure("query p99 ms", &["query_latency_ms", "p99"], Lower, ("<= 3", "<= 3")),
        figure("  p99 in the worker ms", &["service_latency_ms", "query", "p99"], Lower, NONE),
        figure("projection lag p50 ms", &["projection_lag_ms", "p50"], Lower, NONE),
        figure("projection lag p99 ms", &["projection_lag_ms", "p99"], Lower, ("<= 50", "<= 100")),
        // Replies whose event was not seen applied within 60 s: in the percentiles at their age
        // then (a lower bound).
        figure("  samples unresolved", &["projection_lag_ms", "unresolved"], Lower, NONE),
        figure("sync overhead", &["sync_overhead"], Lower, ("< 0.1", "< 0.1")),
        figure("  with its Postgres", &["sync_overhead_with_postgres"], Lower, NONE),
        figure("rebuild events/s", &["rebuild_events_per_sec"], Higher, (">= 100000", "")),
        figure("rejected share", &["rejected_share"], Neither, NONE),
        figure("errors", &["errors", "total"], Lower, NONE),
        figure("rows differing", &["consistency", "rows_differing"], Lower, ("0", "0")),
        figure("  after rebuild", &["consistency", "rows_differing_after_rebuild"], Lower, NONE),
    ]
};

/// The value at `path` in a report (`null` where there is none).
fn at<'a>(root: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(root, |v, p| &v[*p])
}

fn print_table(r: &Value, label: Option<&str>) {
    let with_targets = label.is_some_and(|l| l == "always" || l.starts_with("default"));
    println!(
        "\n{:<24} {:>14} {:>14} {:>9}{}",
        "figure",
        "CipherHorizon",
        "monolith",
        "ratio",
        if with_targets {
            format!("  target ({})", label.unwrap_or_default())
        } else {
            String::new()
        }
    );
    for figure in &FIGURES {
        let path = figure.path;
        let ratio = match path[0] {
            "consistency" => &Value::Null,
            "errors" => &r["ratio"]["errors"],
            _ => at(&r["ratio"], path),
        };
        println!(
            "{:<24} {:>14} {:>14} {:>9}{}",
            figure.name,
            cell(at(r, path)),
            cell(at(&r["baseline"], path)),
            cell(ratio),
            if with_targets {
                format!("  {}", target(label, figure))
            } else {
                String::new()
            }
        );
    }
    println!(
        "(monolith rows differing: its portfolios compared with the states folded from CipherHorizon's stream, but for those whose signals failed in either run)"
    );
    if let Some(file) = r["baseline"]["from"]["file"].as_str() {
        println!("(monolith: measured in {file}, on the same workload)");
    }
    for (key, served) in ["command", "query"].map(|k| (k, &r["service_latency_ms"][k])) {
        if served["restarted"] == true {
            println!(
                "({key} p99 in the worker: not this run's, a worker restarted during it and its counts began again; {} ms over the {} requests since)",
                served["since_start"]["p99"], served["requests"]
            );
        } else if served["since_start"].is_object() {
            println!(
                "({key} p99 in the worker: not this run's, its workers had answered {} of their {} requests before it; {} ms since they started)",
                served["requests_before"], served["requests"], served["since_start"]["p99"]
            );
        }
    }
}

/// A `--tag`: part of a file name, so letters, digits, `.`, `_` and `-`, not beginning with `.`.
fn file_name_part(tag: &str) -> Result<String, String> {
    let fits = tag.len() <= 64
        && !tag.starts_with('.')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if fits && !tag.is_empty() {
        Ok(tag.to_string())
    } else {
        Err("a tag goes into the result's file name: 1 to 64 of [A-Za-z0-9._-], not beginning with `.`".into())
    }
}

/// Creates `out` and checks that a file can be written there.
fn writable(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let probe = out.join(format!(".chctl-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{} cannot take the results", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn write(
    out: &std::path::Path,
    tag: Option<&str>,
    report: &Value,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let stamp = at.format("%Y%m%dT%H%M%SZ").to_string();
    let name = match tag {
        Some(t) => format!("{stamp}-{t}.json"),
        None => format!("{stamp}.json"),
    };
    let text = serde_json::to_string_pretty(report)? + "\n";
    let path = out.join(name);
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let latest = out.join("latest.json");
    std::fs::write(&latest, &text).with_context(|| format!("writing {}", latest.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run fails on differing rows, a failed rebuild, or any failed request, ours or the
    /// baseline's; a clean one does not.
    #[test]
    fn a_run_with_failed_requests_fails() {
        let clean = json!({"consistency": {"rows_differing": 0, "rows_differing_after_rebuild": 0},
                           "rebuild": {}, "errors": {"total": 0},
                           "baseline": {"errors": {"total": 0}}});
        assert_eq!(failures(&clean), Vec::<String>::new());
        let mut ours = clean.clone();
        ours["errors"]["total"] = json!(2000);
        let f = failures(&ours);
        assert!(
            f.len() == 1 && f[0].starts_with("requests failed: 2000 of CipherHorizon's, 0"),
            "{f:?}"
        );
        let mut theirs = clean.clone();
        theirs["baseline"]["errors"]["total"] = json!(1);
        assert_eq!(failures(&theirs).len(), 1);
        let mut differing = clean.clone();
        differing["consistency"]["rows_differing_after_rebuild"] = json!(3);
        assert_eq!(failures(&differing).len(), 1);
        let mut rebuild = clean.clone();
        rebuild["rebuild"]["error"] = json!("stalled");
        assert_eq!(failures(&rebuild).len(), 1);
        // No consistency figure at all is a failure too.
        assert_eq!(failures(&json!({})).len(), 1);
    }

    #[test]
    fn ratios_divide_numbers_and_skip_nulls() {
        let ours = json!({"commands_per_sec": 100.0, "command_latency_ms": {"p50": 2.0, "p99": 4.0, "count": 5},
                          "sync_overhead": null, "errors": {"total": 0}});
        let base = json!({"commands_per_sec": 50.0, "command_latency_ms": {"p50": 1.0, "p99": 0.0, "count": 5},
                          "sync_overhead": null, "errors": {"total": 0}});
        let r = ratios(&ours, &base);
        assert_eq!(r["commands_per_sec"], json!(2.0));
        assert_eq!(r["command_latency_ms"]["p50"], json!(2.0));
        assert_eq!(r["command_latency_ms"]["p99"], Value::Null);
        assert_eq!(r["sync_overhead"], Value::Null);
        assert_eq!(r["errors"], Value::Null);
    }

    #[test]
    fn the_config_says_what_the_deployment_reports_not_the_benchmarks_environment() {
        let mut config = json!({"ch_sync": "immediate", "ch_batch_max": 7, "ch_db_pool": 16,
                                "ch_immediate_timeout_ms": 2000});
        let one = |sync: &str, pool: &str| {
            json!({"ch_sync": sync, "ch_batch_max": "500", "ch_batch_wait_ms": "5",
                   "ch_replay_batch_max": "50000", "ch_immediate_timeout_ms": "2000",
                   "ch_db_pool": pool, "ch_worker_threads": "1"})
        };
        // The command worker's pool (it opens none) is not the projector's.
        let deployment = json!({"cmd-signal": [one("batch", "2")],
                                "proj-portfolio": [one("batch", "16"), one("batch", "4")]});
        with_deployment(&mut config, &deployment);
        assert_eq!(config["ch_sync"], "batch");
        assert_eq!(config["ch_batch_max"], 500);
        assert_eq!(config["ch_batch_wait_ms"], 5);
        assert_eq!(config["ch_db_pool"], "mixed");
        assert_eq!(config["ch_from_environment"], json!([]));
        assert_eq!(config["deployment"], deployment);

        // Workers that report nothing (older ones): the environment's values, said so.
        let mut config = json!({"ch_sync": "immediate", "ch_batch_max": 7});
        with_deployment(
            &mut config,
            &json!({"cmd-signal": [null], "proj-portfolio": []}),
        );
        assert_eq!(config["ch_sync"], "immediate");
        assert_eq!(config["ch_batch_max"], 7);
        let from_env = config["ch_from_environment"].as_array().unwrap();
        assert!(from_env.contains(&json!("ch_sync")) && from_env.len() == 7);
    }

    #[test]
    fn a_tag_is_part_of_a_file_name_and_the_output_is_tried_first() {
        assert_eq!(
            file_name_part("default-eventual").as_deref(),
            Ok("default-eventual")
        );
        for bad in ["", "../../escape", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(file_name_part(bad).is_err(), "{bad:?}");
        }
        let dir = std::env::temp_dir().join(format!("chctl-out-{}", std::process::id()));
        writable(&dir.join("results")).unwrap();
        assert!(dir.join("results").is_dir());
        assert_eq!(std::fs::read_dir(dir.join("results")).unwrap().count(), 0);
        std::fs::write(dir.join("file"), b"").unwrap();
        assert!(
            writable(&dir.join("file")).is_err(),
            "a file is no directory"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_ids_are_short_tokens() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }

    /// A result file of a workload with a baseline, in a directory of its own.
    fn earlier_run(name: &str, config: &Value) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("chctl-baseline-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("default.json");
        let report = json!({"run_id": "b1", "started_at": "2026-11-30T17:00:00Z", "config": config,
                            "env": {"git_commit": "c1"},
                            "baseline": {"commands_per_sec": 1300.0, "errors": {"total": 0},
                                         "consistency": {"rows_differing": 0}}});
        std::fs::write(&file, report.to_string()).unwrap();
        file
    }

    fn workload(signals: u64) -> Value {
        json!({"seed": 42, "portfolios": 1000, "strategies": 100, "signals": signals, "clients": 32,
               "query_clients": 8, "rate": null, "query_rate": null,
               "signals_meant_to_be_rejected": 7500, "ch_sync": "eventual"})
    }

    #[test]
    fn a_baseline_of_the_same_workload_is_taken_with_its_origin() {
        let file = earlier_run("same", &workload(100_000));
        let mut here = workload(100_000);
        here["ch_sync"] = json!("batch");
        let b = super::baseline_from(&file, &here).expect("the same workload");
        assert_eq!(b["commands_per_sec"], 1300.0);
        assert_eq!(b["from"]["run_id"], "b1");
        assert_eq!(b["from"]["file"], file.display().to_string());
        // Its check was against the earlier run's stream, and says so.
        let with = b["consistency"]["compared_with"].as_str().unwrap();
        assert!(with.contains("run b1"), "{with}");
        assert_eq!(b["from"]["env"]["git_commit"], "c1");
        // Taken again from a file that had taken it: the origin stays the run that measured it.
        let again = file.with_file_name("always.json");
        let report = json!({"run_id": "b2", "started_at": "2026-11-30T17:05:00Z",
                            "config": here, "env": {"git_commit": "c2"}, "baseline": b});
        std::fs::write(&again, report.to_string()).unwrap();
        let b2 = super::baseline_from(&again, &here).expect("the same workload");
        assert_eq!(b2["from"], b["from"]);
        assert_eq!(b2["consistency"], b["consistency"]);
        let _ = std::fs::remove_dir_all(file.parent().unwrap());
    }

    #[test]
    fn a_baseline_of_another_workload_is_refused() {
        let file = earlier_run("other", &workload(2_000));
        let e = super::baseline_from(&file, &workload(100_000)).unwrap_err();
        assert!(
            e.to_string()
                .contains("signals is 2000 there and 100000 here"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(file.parent().unwrap());
    }
}
