//! `chctl`: the CipherHorizon admin CLI. Every subcommand is configured by the same `CH_*`
//! environment variables as the workers (README); see `chctl --help`.

mod bench;
mod common;
mod demo;
mod down;
mod procs;
mod rebuild;
mod req;
mod setup;
mod status;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Where `up` keeps its pid file and logs unless told (`--run-dir`, `CH_RUN_DIR`); `make down`'s.
const DEFAULT_RUN_DIR: &str = ".run";

#[derive(Parser)]
#[command(name = "chctl", version, about = "CipherHorizon admin CLI")]
struct Cli {
    /// Where `up` keeps worker logs (`logs/`) and `workers.pids`.
    #[arg(long, env = "CH_RUN_DIR", default_value = DEFAULT_RUN_DIR, global = true)]
    run_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the event stream, the projector consumers, the database and its tables (idempotent).
    Setup(setup::Opts),
    /// Run `setup`, start every worker, wait until all answer; optionally load the demo data.
    Up(up::Args),
    /// Stop the workers started by `up --detach` (from `<run-dir>/workers.pids`).
    Down,
    /// Load the deterministic demo data set through NATS requests and print a report.
    Demo,
    /// Rebuild read models from the whole event stream.
    Rebuild(rebuild::Args),
    /// Ping every service; print the projectors' progress, the stream and each worker's
    /// Postgres sessions. Exits 1 when something is missing or does not answer.
    Status(status::Args),
    /// Send one request and print the reply; exits 1 on an error reply.
    Req(req::Args),
    /// Benchmarks: `bench trade-flow` (the load and its figures) and `bench compare` (result
    /// files side by side).
    Bench(bench::Args),
}

/// `chctl status | head -1`: a reader that closes the pipe early makes `println!` panic (Rust
/// ignores SIGPIPE, and this workspace forbids the `unsafe` to restore it). Such a panic ends
/// chctl quietly with 141, as a tool killed by SIGPIPE; any other panic is reported as usual.
fn quiet_on_broken_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        report(info);
    }));
}

/// The options that may come from the environment: (the flag, its variable).
const FROM_ENV: &[(&str, &str)] = &[
    ("--run-dir", "CH_RUN_DIR"),
    ("--replicas", "CH_STREAM_REPLICAS"),
];

/// Exits with clap's error; one about a value the environment gave (clap names only the flag,
/// which the user may never have typed) names the variable too.
fn refused(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.split(' ').next().unwrap_or_default().to_owned(),
        _ => String::new(),
    };
    let var = FROM_ENV.iter().find(|(f, _)| *f == flag).map(|(_, v)| *v);
    // Arguments as given (a path need not be UTF-8).
    let typed = || {
        std::env::args_os().any(|a| {
            a.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
        })
    };
    match (e.kind(), var) {
        (ErrorKind::InvalidValue | ErrorKind::ValueValidation, Some(var))
            if std::env::var_os(var).is_some() && !typed() =>
        {
            let _ = e.print();
            eprintln!(
                "(the value is {var}'s, from the environment: {var}={:?})",
                std::env::var_os(var).unwrap_or_default()
            );
            std::process::exit(2);
        }
        _ => e.exit(),
    }
}

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    let cli = Cli::try_parse().unwrap_or_else(|e| refused(e));
    // A quiet CLI by default; the workers `up` starts get the caller's RUST_LOG, or none.
    // Set here, before any thread exists.
    // Empty or invalid is unset here too (an invalid one is said once logging is up).
    let given = std::env::var("RUST_LOG").ok();
    let log_default_set = given
        .as_deref()
        .is_none_or(|v| !ch_runtime::telemetry::takes(v));
    if log_default_set {
        std::env::set_var("RUST_LOG", "warn");
    }
    if matches!(cli.cmd, Cmd::Down) {
        // Needs no configuration: a `CH_*` variable set wrong since `up` must not keep the
        // workers running.
        let pid_file = common::pid_file(&cli.run_dir);
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => exit_code(runtime.block_on(down::run(&pid_file))),
            Err(e) => {
                eprintln!("chctl: cannot start the async runtime: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cfg = match ch_runtime::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chctl: {e}");
            return ExitCode::from(2);
        }
    };
    ch_runtime::telemetry::init(cfg.log_json);
    if let Some(bad) = given.filter(|v| !v.trim().is_empty() && log_default_set) {
        // The workers `up` starts get the default too.
        tracing::warn!("RUST_LOG={bad:?} is not a log filter: logging at warn");
    }
    let ctx = common::Ctx::new(cfg, cli.run_dir, log_default_set);
    // As the workers (`CH_WORKER_THREADS`, default 1: the current-thread runtime). For the
    // benchmark's load generator this matters: it shares the cores with what it measures, and
    // its closed-loop clients wait on I/O; a multi-thread runtime cost it about a fifth of its
    // CPU in thread switches.
    let runtime = match ctx.cfg.runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.cmd {
            Cmd::Setup(a) => {
                interruptible(async { setup::run(&ctx, &a).await.map(|()| ExitCode::SUCCESS) })
                    .await
            }
            Cmd::Up(a) => up::run(&ctx, &a).await,
            Cmd::Down => unreachable!("`down` is run before the configuration is read"),
            Cmd::Demo => interruptible(demo::run(&ctx)).await,
            Cmd::Rebuild(a) => interruptible(rebuild::run(&ctx, &a)).await,
            Cmd::Status(a) => interruptible(status::run(&ctx, &a)).await,
            Cmd::Req(a) => interruptible(req::run(&ctx, &a)).await,
            Cmd::Bench(a) => bench::run(&ctx, &a).await,
        }
    });
    exit_code(result)
}

/// A subcommand's exit status; its error said on stderr.
fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `work`, or status 130 on SIGTERM or Ctrl-C. As the only process of a Kubernetes job or
/// test pod (PID 1: the chart's `chctl setup` and `helm test`), chctl would otherwise ignore
/// SIGTERM and be killed only when the grace period ends. What these commands leave half
/// done is safe to leave: setup is idempotent, a replay resumes from its checkpoint.
/// (`up` handles its signals itself: it stops the workers it started.)
async fn interruptible(
    work: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let stop = ch_runtime::shutdown::on_signal();
    tokio::select! {
        done = work => done,
        () = stop.cancelled() => {
            eprintln!("chctl: interrupted");
            Ok(ExitCode::from(130))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn counts_and_timeouts_out_of_range_are_refused_before_anything_runs() {
        use clap::Parser;
        for args in [
            "rebuild all --stall-timeout 0",
            "req ch.x --timeout 0",
            "up --timeout 0",
            "setup --replicas 0",
            "setup --replicas 6",
            "up --timeout 18446744073709551615",
            "req ch.x --timeout 3601",
            "bench trade-flow --portfolios 0",
            "bench trade-flow --strategies 0",
            "bench trade-flow --signals 0",
            "bench trade-flow --clients 0",
            "bench trade-flow --setup-concurrency 0",
        ] {
            let argv = std::iter::once("chctl").chain(args.split(' '));
            let e = super::Cli::try_parse_from(argv).err();
            assert_eq!(
                e.map(|e| e.kind()),
                Some(clap::error::ErrorKind::ValueValidation),
                "{args}"
            );
        }
        let ok = "bench trade-flow --quick --query-clients 0 --signals 1".split(' ');
        assert!(super::Cli::try_parse_from(std::iter::once("chctl").chain(ok)).is_ok());
    }
}
