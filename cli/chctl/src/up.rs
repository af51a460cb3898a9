//! `chctl up`: setup, start every worker as a child process, wait until each service answers
//! `$SRV.PING`, optionally load the demo data, print how to talk to it. In the foreground until
//! Ctrl-C or SIGTERM (then the workers are drained), or `--detach`ed.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::Client;
use futures::stream::{FuturesUnordered, StreamExt};
use rustix::process::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::common::{ping, projector_status, redact, text, wait_ping, Ctx, PROJECTIONS, WORKERS};
use crate::{demo, procs, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Leave the workers running and exit once all answer (`chctl down` stops them).
    #[arg(long)]
    pub detach: bool,
    /// Load the demo data set once the workers answer.
    #[arg(long)]
    pub demo: bool,
    /// Where the worker binaries are (default: next to chctl).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for every service to answer, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    #[command(flatten)]
    pub setup: setup::Opts,
}

/// Ctrl-C, SIGTERM and SIGHUP (the terminal closed: the workers, in a process group of their
/// own, would not hear it), registered before the first child starts.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// The started workers and the channel their exits arrive on.
struct Fleet {
    entries: Vec<procs::Entry>,
    running: BTreeMap<usize, i32>,
    exits: mpsc::UnboundedReceiver<(usize, std::io::Result<ExitStatus>)>,
    log_dir: PathBuf,
}

impl Fleet {
    fn log(&self, i: usize) -> PathBuf {
        self.log_dir.join(format!("{}.log", self.entries[i].name))
    }

    fn exited(&mut self, i: usize, status: &std::io::Result<ExitStatus>) -> String {
        self.running.remove(&i);
        let how = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        format!("{} {how}", self.entries[i].name)
    }

    /// SIGTERM to every running worker, wait up to `grace`, then SIGKILL.
    async fn stop(&mut self, grace: Duration) {
        for pid in self.running.values() {
            procs::signal(*pid, Signal::TERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut killed = false;
        while !self.running.is_empty() {
            tokio::select! {
                Some((i, st)) = self.exits.recv() => {
                    let line = self.exited(i, &st);
                    println!("  stopped {line}");
                }
                _ = tokio::time::sleep_until(deadline), if !killed => {
                    for (i, pid) in &self.running {
                        eprintln!("  {} did not stop within {grace:?}: SIGKILL", self.entries[*i].name);
                        procs::signal(*pid, Signal::KILL);
                    }
                    killed = true;
                }
                else => break,
            }
        }
    }
}

fn bin_dir(args: &Args) -> Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe().context("locating chctl's own executable")?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Refuses to start a second set of workers over the pid file of a running one.
fn check_not_running(ctx: &Ctx) -> Result<()> {
    let path = ctx.pid_file();
    if let Some(entries) = procs::read_pid_file(&path)? {
        let live: Vec<String> = entries
            .iter()
            .filter(|e| procs::alive(e))
            .map(|e| format!("{} ({})", e.name, e.pid))
            .collect();
        if !live.is_empty() {
            bail!(
                "workers of an earlier `up` are still running: {}\n(stop them with {}, or use another --run-dir)",
                live.join(", "),
                down_hint(&ctx.run_dir)
            );
        }
        procs::remove_pid_file(&path);
    }
    Ok(())
}

fn new_fleet(
    ctx: &Ctx,
) -> (
    Fleet,
    mpsc::UnboundedSender<(usize, std::io::Result<ExitStatus>)>,
) {
    let (tx, exits) = mpsc::unbounded_channel();
    let fleet = Fleet {
        entries: Vec::new(),
        running: BTreeMap::new(),
        exits,
        log_dir: ctx.log_dir(),
    };
    (fleet, tx)
}

/// Starts every worker; on an error the ones already started stay in `fleet` (to be stopped).
fn spawn_all(
    ctx: &Ctx,
    bins: &Path,
    fleet: &mut Fleet,
    tx: &mpsc::UnboundedSender<(usize, std::io::Result<ExitStatus>)>,
) -> Result<()> {
    let log_dir = ctx.log_dir();
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    for w in WORKERS {
        let p = bins.join(w);
        if !p.is_file() {
            bail!(
                "worker binary {} not found (build them with `cargo build --workspace --bins`, or pass --bin-dir)",
                p.display()
            );
        }
    }
    for (i, w) in WORKERS.iter().enumerate() {
        let log_path = log_dir.join(format!("{w}.log"));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = tokio::process::Command::new(bins.join(w));
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: a Ctrl-C in the terminal reaches chctl, which then drains the
            // workers (and a detached set is not hit by the terminal's signals).
            .process_group(0);
        if ctx.log_default_set {
            cmd.env_remove("RUST_LOG");
        }
        // Plain text in log files (tracing's colours are for terminals).
        if std::env::var_os("NO_COLOR").is_none() {
            cmd.env("NO_COLOR", "1");
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {w}"))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .context("child without pid")?;
        fleet.entries.push(procs::Entry {
            name: (*w).to_owned(),
            pid,
        });
        fleet.running.insert(i, pid);
        let tx = tx.clone();
        tokio::spawn(async move {
            let st = child.wait().await;
            let _ = tx.send((i, st));
        });
    }
    Ok(())
}

enum Wait {
    Ready(Vec<Duration>),
    Failed(String),
    Interrupted(&'static str),
}

async fn wait_ready(
    ctx: &Ctx,
    client: &Client,
    fleet: &mut Fleet,
    sigs: &mut Signals,
    timeout: Duration,
) -> Wait {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut pending: FuturesUnordered<_> = WORKERS
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let service = ctx.service(w);
            async move { (i, wait_ping(client, &service, started, deadline).await) }
        })
        .collect();
    let mut took = vec![Duration::ZERO; WORKERS.len()];
    let mut missing = Vec::new();
    loop {
        tokio::select! {
            r = pending.next() => match r {
                None => break,
                Some((i, Some(t))) => took[i] = t,
                Some((i, None)) => missing.push(i),
            },
            Some((i, st)) = fleet.exits.recv() => {
                let line = fleet.exited(i, &st);
                return Wait::Failed(format!(
                    "worker {line} before answering; {}:\n{}",
                    fleet.log(i).display(),
                    tail(&fleet.log(i), 15)
                ));
            }
            s = sigs.recv() => return Wait::Interrupted(s),
        }
    }
    if missing.is_empty() {
        return Wait::Ready(took);
    }
    let mut msg = String::new();
    for i in missing {
        msg.push_str(&format!(
            "{} did not answer $SRV.PING.{} within {timeout:?}; {}:\n{}\n",
            WORKERS[i],
            ctx.service(WORKERS[i]),
            fleet.log(i).display(),
            tail(&fleet.log(i), 15)
        ));
    }
    Wait::Failed(msg)
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<ExitCode> {
    check_not_running(ctx)?;
    let bins = bin_dir(args)?;
    let mut sigs = Signals::new()?;
    setup::run(ctx, &args.setup).await?;
    let client = ctx.connect().await?;
    let already: Vec<String> = futures::future::join_all(WORKERS.iter().map(|w| {
        let svc = ctx.service(w);
        let client = &client;
        async move {
            ping(client, &svc, Duration::from_millis(300))
                .await
                .map(|_| svc)
        }
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    if !already.is_empty() {
        eprintln!(
            "note: {} already answer on {} (another `up` with prefix {}?); starting more replicas",
            already.join(", "),
            redact(&ctx.cfg.nats_url),
            ctx.subjects.prefix()
        );
    }

    std::fs::create_dir_all(&ctx.run_dir)
        .with_context(|| format!("creating {}", ctx.run_dir.display()))?;
    let (mut fleet, tx) = new_fleet(ctx);
    let spawned = spawn_all(ctx, &bins, &mut fleet, &tx)
        .and_then(|()| procs::write_pid_file(&ctx.pid_file(), &fleet.entries));
    drop(tx);
    if let Err(e) = spawned {
        fleet.stop(Duration::from_secs(10)).await;
        procs::remove_pid_file(&ctx.pid_file());
        return Err(e);
    }
    println!(
        "started {} workers from {}; logs in {}",
        WORKERS.len(),
        bins.display(),
        ctx.log_dir().display()
    );

    let took = match wait_ready(
        ctx,
        &client,
        &mut fleet,
        &mut sigs,
        Duration::from_secs(args.timeout),
    )
    .await
    {
        Wait::Ready(t) => t,
        Wait::Failed(msg) => {
            eprintln!("{msg}");
            eprintln!("stopping the workers");
            fleet.stop(Duration::from_secs(10)).await;
            procs::remove_pid_file(&ctx.pid_file());
            bail!("not every service came up");
        }
        Wait::Interrupted(s) => {
            eprintln!("{s}: stopping the workers");
            fleet.stop(Duration::from_secs(10)).await;
            procs::remove_pid_file(&ctx.pid_file());
            return Ok(ExitCode::from(130));
        }
    };
    println!(
        "services (prefix {}, NATS {}):",
        ctx.subjects.prefix(),
        redact(&ctx.cfg.nats_url)
    );
    for (i, e) in fleet.entries.iter().enumerate() {
        println!(
            "  up  {:<24} pid {:<8} ready after {} ms",
            ctx.service(&e.name),
            e.pid,
            took[i].as_millis()
        );
    }

    let mut code = ExitCode::SUCCESS;
    if args.demo {
        let loaded = async {
            let out = demo::load(ctx, &client, false).await?;
            println!(
                "demo data: {} commands stored, {} duplicate, {} already existing; signals {} executed, {} rejected",
                out.stored, out.duplicates, out.existing, out.executed, out.rejected
            );
            demo::report(ctx, &client, out.last_seq).await
        }
        .await;
        if let Err(e) = loaded {
            eprintln!("the demo data could not be loaded: {e:#}");
            code = ExitCode::FAILURE;
        }
    }
    print_counts(ctx, &client).await;
    print_howto(ctx, args.demo);

    if args.detach {
        if code != ExitCode::SUCCESS {
            // Not left running on a failed `up` (whose caller may stop the server they use).
            eprintln!("stopping the workers");
            fleet.stop(Duration::from_secs(10)).await;
            procs::remove_pid_file(&ctx.pid_file());
            return Ok(code);
        }
        println!(
            "\nworkers detached (pids in {}); stop them with {}",
            ctx.pid_file().display(),
            down_hint(&ctx.run_dir)
        );
        return Ok(code);
    }
    println!("\nrunning in the foreground: Ctrl-C stops every worker");
    loop {
        tokio::select! {
            s = sigs.recv() => {
                println!("{s}: stopping the workers");
                break;
            }
            Some((i, st)) = fleet.exits.recv() => {
                // A worker that failed fails the run (one that exits 0 was stopped by a
                // signal of its own: a Ctrl-C reaches the whole process group).
                if !matches!(&st, Ok(s) if s.success()) {
                    code = ExitCode::FAILURE;
                }
                let line = fleet.exited(i, &st);
                eprintln!("worker {line}; see {}", fleet.log(i).display());
                if fleet.running.is_empty() {
                    eprintln!("every worker has exited");
                    break;
                }
            }
        }
    }
    fleet.stop(Duration::from_secs(15)).await;
    procs::remove_pid_file(&ctx.pid_file());
    println!("stopped");
    Ok(code)
}

async fn print_counts(ctx: &Ctx, client: &Client) {
    let js = async_nats::jetstream::new(client.clone());
    if let Ok(s) = js.get_stream(ctx.subjects.stream_name()).await {
        if let Ok(info) = s.get_info().await {
            println!(
                "\nstream {}: {} events, last seq {}",
                info.config.name, info.state.messages, info.state.last_sequence
            );
        }
    }
    for p in PROJECTIONS {
        // Give each projector a moment to apply what was just written.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut status = projector_status(ctx, client, p).await;
        while status.as_ref().is_ok_and(|v| v["lag_events"] != 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = projector_status(ctx, client, p).await;
        }
        if let Ok(v) = status {
            println!(
                "read model {p:<10} last_seq {}  lag {} events",
                text(&v, "last_seq"),
                text(&v, "lag_events")
            );
        }
    }
}

fn print_howto(ctx: &Ctx, demo: bool) {
    // Without its credentials: give the nats CLI yours (`--user`, `--password`, `--token`).
    let url = redact(&ctx.cfg.nats_url);
    // chctl as it was started here (under cargo's target directory, wherever that is).
    let chctl = std::env::args().next().unwrap_or_else(|| "chctl".into());
    print!("{}", howto(&url, ctx.subjects.prefix(), &chctl, demo));
}

/// Requests to try, on the demo's ids when `demo` loaded them (else README's examples, which
/// make their own ids: the demo's would be `not_found`).
fn howto(url: &str, p: &str, chctl: &str, demo: bool) -> String {
    let req =
        |subject: &str, body: &str| format!("  NATS_URL={url} nats req {p}.{subject} '{body}'\n");
    let mut out =
        format!("\ntalk to it with the nats CLI (or `{chctl} req <subject> '<json>'`):\n");
    if demo {
        let (user, btc) = (demo::USER, demo::BTC_STRATEGY);
        out += &req(
            "query.portfolio.performance",
            r#"{"portfolio_id":"demo-1"}"#,
        );
        out += &req("query.strategy.list", &format!(r#"{{"user_id":"{user}"}}"#));
        out += &req(
            "query.strategy.get",
            &format!(r#"{{"strategy_id":"{btc}"}}"#),
        );
        out += &req(
            "cmd.portfolio.update",
            r#"{"portfolio_id":"demo-1","op":"deposit","amount":"1000"}"#,
        );
        out += &req(
            "cmd.signal.execute",
            &format!(
                r#"{{"portfolio_id":"demo-1","strategy_id":"{btc}","symbol":"BTC-USDT","side":"buy","quantity":"0.01","price":"66500"}}"#
            ),
        );
        out += &req(
            "cmd.market.price",
            r#"{"symbol":"BTC-USDT","price":"67000"}"#,
        );
    } else {
        out += "  the requests of README's \"Talking to it with the nats CLI\" (or start with --demo for data to ask about)\n";
    }
    out + &format!("  NATS_URL={url} nats micro ls\n")
}

/// How to stop detached workers: `make down` and a bare `chctl down` look in the default run
/// directory only.
fn down_hint(run_dir: &Path) -> String {
    if run_dir == Path::new(crate::DEFAULT_RUN_DIR) {
        "`chctl down` (or `make down`)".into()
    } else {
        format!("`chctl --run-dir {} down`", run_dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hints_name_the_demo_only_when_it_was_loaded() {
        let with = howto("nats://h:4222", "desk", "chctl", true);
        assert!(
            with.contains(
                "nats req desk.query.portfolio.performance '{\"portfolio_id\":\"demo-1\"}'"
            ),
            "{with}"
        );
        assert!(with.contains(demo::BTC_STRATEGY), "{with}");
        let without = howto("nats://h:4222", "desk", "chctl", false);
        assert!(
            !without.contains("demo-1") && !without.contains(demo::BTC_STRATEGY),
            "{without}"
        );
        assert!(
            without.contains("NATS_URL=nats://h:4222 nats micro ls"),
            "{without}"
        );
    }

    #[test]
    fn the_stop_hint_names_a_run_directory_of_its_own() {
        assert_eq!(
            down_hint(Path::new(".run")),
            "`chctl down` (or `make down`)"
        );
        assert_eq!(
            down_hint(Path::new("/tmp/x")),
            "`chctl --run-dir /tmp/x down`"
        );
    }
}
