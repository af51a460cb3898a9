//! `chctl setup`: the event stream, the projectors' durable consumers, the database and its
//! tables. Idempotent: each step says whether it created, updated or found something in place,
//! and warns of stream settings it leaves alone that may lose events.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use ch_readmodel::{PortfolioProjection, StrategyProjection, MIGRATIONS};
use ch_runtime::app::App;
use ch_runtime::eventstore::{
    self, ConsumerSetup, StreamSetup, CONSUMER_PORTFOLIO_JSON, CONSUMER_STRATEGY_JSON,
};
use ch_runtime::pg::{self, Claim};
use ch_runtime::projector::Projection;

use crate::common::{redact, Ctx};

#[derive(clap::Args, Clone)]
pub struct Opts {
    /// Replicas of a newly created stream (3 on a cluster); an existing stream keeps its own.
    #[arg(long, env = "CH_STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5))]
    pub replicas: usize,
}

pub async fn run(ctx: &Ctx, args: &Opts) -> Result<()> {
    // A URL that cannot work, or a schema that holds another stream's read models, is said
    // before anything is made on NATS.
    pg::check_url(&ctx.cfg.database_url)?;
    let client = ctx.connect().await?;
    let js = jetstream::new(client.clone());
    eventstore::wait_ready(&js, Duration::from_secs(15))
        .await
        .with_context(|| {
            let url = redact(&ctx.cfg.nats_url);
            if client.server_info().jetstream {
                format!("JetStream at {url}")
            } else {
                format!(
                    "JetStream at {url}: the server {}",
                    ch_runtime::app::JETSTREAM_OFF
                )
            }
        })?;

    let name = ctx.subjects.stream_name();
    let (url, schema) = (&ctx.cfg.database_url, &ctx.cfg.db_schema);
    let db_existed = pg::connect(url, None).await.is_ok();
    if db_existed {
        pg::check_stream(url, schema, &name, last_seq(&js, &name), Claim::No).await?;
    }
    let (stream, done, risks) =
        eventstore::ensure_stream_reporting(&js, &ctx.subjects, args.replicas)
            .await
            .with_context(|| format!("ensuring stream {name}"))?;
    let state = match done {
        StreamSetup::Created => "created".to_owned(),
        StreamSetup::InPlace => "in place".to_owned(),
        StreamSetup::Updated(settings) => format!("updated ({})", settings.join(", ")),
    };
    println!(
        "stream    {name} on {}: {state}",
        ctx.subjects.events_filter()
    );
    for risk in risks {
        eprintln!("warning: stream {name}: {risk} (left as it is: the stream is the only copy of the events)");
    }

    for json in [CONSUMER_PORTFOLIO_JSON, CONSUMER_STRATEGY_JSON] {
        let cfg = eventstore::consumer_config(json, &ctx.subjects)?;
        let durable = cfg
            .durable_name
            .clone()
            .context("a consumer definition in nats/consumers/ has no durable_name")?;
        let state = match eventstore::ensure_consumer(&stream, cfg)
            .await
            .with_context(|| format!("consumer {durable}"))?
        {
            ConsumerSetup::Created => "created".to_owned(),
            ConsumerSetup::InPlace => "in place".to_owned(),
            ConsumerSetup::Updated(settings) => format!("updated ({})", settings.join(", ")),
            ConsumerSetup::LeftToProjector(settings) => format!(
                "differs in {}: its projector replaces it when it starts",
                settings.join(", ")
            ),
        };
        println!("consumer  {name} > {durable}: {state}");
    }

    let hint = || {
        format!(
            "PostgreSQL at {} (is it running? `scripts/pg.sh` starts a local one; or set CH_DATABASE_URL)",
            redact(url)
        )
    };
    pg::ensure_database(url).await.with_context(hint)?;
    let before = applied(url, schema).await;
    // Postgres answered above: what fails here is the schema, not the server.
    pg::migrate(url, schema, MIGRATIONS)
        .await
        .with_context(|| format!("schema {schema} at {}", redact(url)))?;
    pg::check_stream(url, schema, &name, last_seq(&js, &name), Claim::Yes).await?;
    let after = applied(url, schema).await;
    println!(
        "database  {}: {}",
        redact(url),
        if db_existed { "in place" } else { "created" }
    );
    let fresh = after.saturating_sub(before);
    println!(
        "schema    {schema}: {} ({after} of {} migrations applied)",
        if fresh == 0 {
            "up to date".to_owned()
        } else {
            format!("applied {fresh} migration(s)")
        },
        MIGRATIONS.len()
    );

    // A read model folded from an earlier stream of the same name (the stream was deleted and
    // made again, e.g. by `make clean-run`, or the workers moved to another server's; another
    // prefix's schema was refused above) would skip the new stream's first events and keep the
    // old one's. Read models are disposable: empty it, its projector replays the stream.
    // Set-up's own sessions: a CH_DB_POOL below a projector's 2 is the workers' business (they
    // refuse it), not a reason to fail here, after the stream and the migrations are done.
    let mut cfg = ctx.cfg.clone();
    cfg.db_pool_size = cfg.db_pool_size.max(2);
    let app = App::start(cfg, "chctl").await?;
    reset_if_from_another_stream(&app, PortfolioProjection::default()).await?;
    reset_if_from_another_stream(&app, StrategyProjection).await?;
    Ok(())
}

/// Stream `name`'s last sequence, for the schema's claim: 0 for a stream not made yet (looked
/// up, not made).
async fn last_seq(js: &jetstream::Context, name: &str) -> Result<u64, ch_runtime::DbError> {
    let unread = |e: &dyn std::fmt::Display| {
        ch_runtime::DbError::Unavailable(format!("stream {name}'s last sequence: {e}"))
    };
    match js.get_stream(name).await {
        Ok(mut s) => s
            .info()
            .await
            .map(|i| i.state.last_sequence)
            .map_err(|e| unread(&e)),
        Err(e) if crate::common::is_not_found(&e) => Ok(0),
        Err(e) => Err(unread(&e)),
    }
}

/// Empties `projection`'s read model when it was folded from another stream than the one
/// there now ([`ch_runtime::projector::Projector::reset_if_from_another_stream`]), saying why.
async fn reset_if_from_another_stream<P: Projection>(app: &App, projection: P) -> Result<()> {
    let name = projection.name();
    let projector = ch_readmodel::workers::projector(app, projection)?;
    if let Some(why) = projector
        .reset_if_from_another_stream()
        .await
        .with_context(|| format!("checking which stream read model {name} was folded from"))?
    {
        println!("read model {name}: {why}; reset (its projector folds this stream again)");
    }
    Ok(())
}

/// How many migrations the schema has (0 when it has none or cannot say).
async fn applied(url: &str, schema: &str) -> usize {
    let Ok(client) = pg::connect(url, Some(schema)).await else {
        return 0;
    };
    match client
        .query_one("SELECT count(*) FROM ch_migrations", &[])
        .await
    {
        Ok(row) => usize::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        Err(_) => 0,
    }
}
