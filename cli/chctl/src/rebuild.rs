//! `chctl rebuild`: empties read models and replays the whole stream into them.
//!
//! When no projector of that read model runs, the replay happens here; when one runs (it holds
//! the projection's advisory lock), the reset makes it replay, and this follows its progress:
//! the checkpoints it announces on `<prefix>.progress.<name>` after every commit, and its
//! status on `<prefix>.admin.projector.<name>.status`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::Subscriber;
use ch_readmodel::{PortfolioProjection, StrategyProjection};
use ch_runtime::app::App;
use ch_runtime::eventstore;
use ch_runtime::projector::{Projection, Projector};
use futures::StreamExt;

use crate::common::{projector_status, Ctx};

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    Portfolio,
    Strategy,
    All,
}

#[derive(clap::Args)]
pub struct Args {
    /// Which read model.
    #[arg(value_enum)]
    pub target: Target,
    /// Give up when a running projector makes no progress for this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stall_timeout: u64,
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<ExitCode> {
    let app = App::start(ctx.cfg.clone(), "chctl").await?;
    let names: &[&str] = match args.target {
        Target::Portfolio => &["portfolio"],
        Target::Strategy => &["strategy"],
        Target::All => &["portfolio", "strategy"],
    };
    // Before anything is created or reset where this chctl points.
    for name in names {
        if let Ok(status) = projector_status(ctx, &app.client, name).await {
            same_read_model(ctx, name, &status).await?;
        }
    }
    ch_readmodel::workers::migrate(&app)
        .await
        .context("migrating the read-model schema")?;
    let stall = Duration::from_secs(args.stall_timeout);
    if matches!(args.target, Target::Portfolio | Target::All) {
        rebuild(ctx, &app, PortfolioProjection::default(), stall).await?;
    }
    if matches!(args.target, Target::Strategy | Target::All) {
        rebuild(ctx, &app, StrategyProjection, stall).await?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn rebuild<P: Projection>(
    ctx: &Ctx,
    app: &App,
    projection: P,
    stall: Duration,
) -> Result<()> {
    let name = projection.name();
    let filter = eventstore::sparse_filter(projection.consumer_json(), &ctx.subjects);
    let projector = ch_readmodel::workers::projector(app, projection)?;
    let head = app.store.last_seq().await?;
    let events = match &filter {
        None => head,
        Some(f) => events_on(app, f).await?,
    };
    match &filter {
        None => println!("{name}: rebuilding from {events} events"),
        Some(f) => println!("{name}: rebuilding from {events} events ({f} of the stream's {head})"),
    }
    // Subscribed before the reset: a replay may be over before this process asks.
    let progress = app
        .client
        .subscribe(ctx.subjects.progress(name))
        .await
        .context("subscribing to the projector's progress")?;
    // A projector that answers is reset under (it replays); with none answering, the lock's
    // holder, if any, may be another `chctl rebuild` replaying: not reset under.
    let running = projector_status(ctx, &app.client, name).await.is_ok();
    let started = Instant::now();
    let reached = {
        let replay = async {
            if running {
                projector.rebuild().await
            } else {
                projector.rebuild_if_free().await
            }
        };
        tokio::select! {
            result = replay => result.with_context(|| format!("rebuilding {name}"))?,
            () = watch_replay(name, &projector, head) => unreachable!("watches until the replay ends"),
        }
    };
    let last = match reached {
        Some(last) => last,
        None if !running => bail!(
            "{name}: another process holds the projection's lock, but no projector answers {}: \
             another `chctl rebuild` replaying it, or a projector starting? Nothing was reset",
            ctx.subjects.projector_status(name)
        ),
        None => {
            println!(
                "{name}: a running projector holds the lock; it replays, following its progress"
            );
            follow(ctx, app, name, head, stall, progress).await?.last
        }
    };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{name}: rebuilt up to seq {last}: {events} events in {secs:.2} s ({:.0} events/s)",
        events as f64 / secs.max(1e-6)
    );
    Ok(())
}

/// Refuses, resetting nothing, when the running projector's read model (its status says
/// where: database, schema, server) is not the one this process would reset: `chctl` run
/// without the workers' `CH_DATABASE_URL` or `CH_DB_SCHEMA` would otherwise rebuild another
/// database's, report success, and leave the projector's as it was. A projector that does not
/// say (an older release) is taken at its word.
async fn same_read_model(ctx: &Ctx, name: &str, status: &serde_json::Value) -> Result<()> {
    let theirs = &status["read_model"];
    if theirs.is_null() {
        return Ok(());
    }
    let ours = async {
        let db = ch_runtime::pg::connect(&ctx.cfg.database_url, Some(&ctx.cfg.db_schema)).await?;
        ch_runtime::pg::whereabouts(&db).await
    }
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{name}: the running projector's read model is {theirs}, and this chctl's \
             CH_DATABASE_URL cannot be read ({e}): give chctl the workers' settings. Nothing was \
             reset"
        )
    })?;
    if &ours != theirs {
        let describe = |w: &serde_json::Value, schema: &str| {
            format!(
                "database {}, schema {schema}, on the server started at {}",
                w["database"].as_str().unwrap_or("?"),
                w["server_started_at"].as_str().unwrap_or("?")
            )
        };
        let missing = if ours["schema"].is_null() {
            " (no such schema there)"
        } else {
            ""
        };
        bail!(
            "{name}: the running projector's read model is in {}; this chctl is set for {}{missing} \
             (CH_DATABASE_URL, CH_DB_SCHEMA): give chctl the workers' settings. Nothing was reset",
            describe(theirs, theirs["schema"].as_str().unwrap_or("?")),
            describe(&ours, &ctx.cfg.db_schema),
        );
    }
    Ok(())
}

/// How many events the stream holds on the subjects of `filter` (a sparse projection's: the
/// strategy projector reads only strategy events, a few among the stream's).
async fn events_on(app: &App, filter: &str) -> Result<u64> {
    let mut subjects = app
        .store
        .stream()
        .info_with_subjects(filter)
        .await
        .context("reading the stream's subjects")?;
    let mut n = 0;
    while let Some(subject) = subjects.next().await {
        n += subject.context("reading the stream's subjects")?.1 as u64;
    }
    Ok(n)
}

/// Prints every second how far this process's replay has got (its transactions commit every
/// `CH_REPLAY_BATCH_MAX` events; the events applied before the next commit count too). Runs
/// until dropped.
async fn watch_replay<P: Projection>(name: &str, projector: &Projector<P>, head: u64) {
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    every_second.tick().await;
    loop {
        every_second.tick().await;
        let (committed, applied) = (projector.last_committed(), projector.replay_applied());
        println!("{}", progress_line(name, head, committed, applied));
    }
}

/// `<name>: <applied> / <head>`, and what is committed of it when that is less.
fn progress_line(name: &str, head: u64, committed: Option<u64>, applied: Option<u64>) -> String {
    match (committed, applied) {
        (Some(c), Some(a)) if a > c => format!("{name}: {a} / {head} ({c} committed)"),
        (Some(c), _) => format!("{name}: {c} / {head}"),
        (None, Some(a)) => format!("{name}: {a} / {head}"),
        (None, None) => format!("{name}: replaying, of {head}"),
    }
}

/// How a running projector's replay went, as [`follow`] saw it.
pub struct Followed {
    /// The checkpoint it reached (`head` or beyond).
    pub last: u64,
    /// When it was first seen past the reset and short of `head`, and where: the replay's
    /// first committed transaction (none when one transaction did it all).
    pub first_move: Option<(Instant, u64)>,
}

/// Follows the running projector until it has applied `head`: woken by each checkpoint it
/// announces and once a second, it asks the projector's status (an announcement from before
/// the reset may still arrive; the status reads the checkpoint).
pub async fn follow(
    ctx: &Ctx,
    app: &App,
    name: &str,
    head: u64,
    stall: Duration,
    mut progress: Subscriber,
) -> Result<Followed> {
    let mut first_move = None;
    let mut best = 0u64;
    // The furthest a replay's open transaction was seen: a standby replica (the status
    // endpoint is a queue group) answers with none, and the line should not fall back.
    let mut replay_seen: Option<u64> = None;
    let mut last_move = Instant::now();
    let mut next_print = Instant::now();
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(m) = progress.next() => {
                let announced: Option<u64> =
                    std::str::from_utf8(&m.payload).ok().and_then(|s| s.parse().ok());
                if let Some(seq) = announced.filter(|&seq| seq < head) {
                    // On its way: nothing to ask yet.
                    if seq > 0 {
                        first_move.get_or_insert((Instant::now(), seq));
                    }
                    if seq > best {
                        best = seq;
                        last_move = Instant::now();
                    }
                    continue;
                }
            }
            _ = every_second.tick() => {}
        }
        let status = projector_status(ctx, &app.client, name).await;
        let answering = status.is_ok();
        match status {
            Ok(v) => {
                let seq = v["last_seq"].as_u64().unwrap_or(0);
                if seq >= head {
                    return Ok(Followed {
                        last: seq,
                        first_move,
                    });
                }
                // Between its commits, a replay moves on in the open transaction: progress too.
                replay_seen = replay_seen.max(v["replay_applied"].as_u64());
                let applied = replay_seen.filter(|&a| a > seq);
                let at = applied.map_or(seq, |a| a.max(seq));
                if at > best {
                    best = at;
                    last_move = Instant::now();
                }
                if Instant::now() >= next_print {
                    println!(
                        "{} (lag {})",
                        progress_line(name, head, Some(seq), applied),
                        v["lag_events"].as_u64().unwrap_or(0)
                    );
                    next_print = Instant::now() + Duration::from_secs(1);
                }
            }
            Err(e) => {
                if Instant::now() >= next_print {
                    eprintln!("{name}: no status yet: {e:#}");
                    next_print = Instant::now() + Duration::from_secs(1);
                }
            }
        }
        if last_move.elapsed() > stall && !answering {
            bail!(
                "{name}: no projector answers any more, and none moved for {stall:?} (at {best} of \
                 {head}): the read model stays as far as it was replayed until a projector runs; \
                 start one, or run `chctl rebuild {name}` again (with none running, chctl replays it)"
            );
        }
        if last_move.elapsed() > stall {
            bail!("{name}: the running projector made no progress for {stall:?} (at {best} of {head}); see its log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::progress_line;

    #[test]
    fn progress_counts_what_a_replay_applied_before_its_commit() {
        assert_eq!(
            progress_line("portfolio", 90, Some(0), Some(35)),
            "portfolio: 35 / 90 (0 committed)"
        );
        assert_eq!(
            progress_line("portfolio", 90, Some(50), None),
            "portfolio: 50 / 90"
        );
        assert_eq!(
            progress_line("portfolio", 90, Some(50), Some(40)),
            "portfolio: 50 / 90"
        );
        assert_eq!(
            progress_line("portfolio", 90, None, Some(7)),
            "portfolio: 7 / 90"
        );
    }
}
