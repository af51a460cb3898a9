//! The command worker: serves any subset of the command endpoints of API.md. Each command
//! binary (`cmd-strategy`, `cmd-portfolio`, `cmd-signal`, `cmd-market`) is this with its
//! endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::Message;
use ch_domain::market::MarketState;
use ch_domain::portfolio::{PortfolioCommand, PortfolioFacts, PortfolioState};
use ch_domain::request::{parse_command, Endpoint, Target};
use ch_domain::strategy::StrategyState;
use ch_domain::{Aggregate, AggregateType};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Span};
use uuid::Uuid;

use crate::app::App;
use crate::command::{Executor, FactSource, NoFacts};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::query::Progress;
use crate::service::{self, Handler};
use crate::SyncMode;
use std::time::Duration;

/// Loads what a portfolio decision needs: the strategy a command names, and for a signal, a
/// deposit or a withdrawal the marks of the portfolio's symbols (the equity the drawdown halt
/// checks, and the equity that moves its high-water mark after a fill or a flow).
struct PortfolioFactSource {
    strategies: Arc<Executor<StrategyState>>,
    markets: Arc<Executor<MarketState>>,
}

impl FactSource<PortfolioState> for PortfolioFactSource {
    async fn facts(
        &self,
        state: &PortfolioState,
        command: &PortfolioCommand,
    ) -> Result<PortfolioFacts, ApiError> {
        let strategy_id = match command {
            PortfolioCommand::AttachStrategy { strategy_id }
            | PortfolioCommand::DetachStrategy { strategy_id } => Some(strategy_id),
            PortfolioCommand::ExecuteSignal(s) => Some(&s.strategy_id),
            _ => None,
        };
        let mut facts = PortfolioFacts {
            strategy: None,
            marks: BTreeMap::new(),
        };
        if let Some(id) = strategy_id {
            let s = self.strategies.repo().fact(id).await?;
            if s.version() > 0 {
                facts.strategy = Some(s);
            }
        }
        if matches!(
            command,
            PortfolioCommand::ExecuteSignal(_)
                | PortfolioCommand::Deposit { .. }
                | PortfolioCommand::Withdraw { .. }
        ) {
            for symbol in state.positions.keys() {
                if let Some(p) = self.markets.repo().fact(symbol).await?.price {
                    facts.marks.insert(symbol.clone(), p);
                }
            }
        }
        Ok(facts)
    }
}

/// Handles the command endpoints of one worker.
pub struct Commands {
    strategies: Arc<Executor<StrategyState>>,
    portfolios: Executor<PortfolioState>,
    markets: Arc<Executor<MarketState>>,
    portfolio_facts: PortfolioFactSource,
}

impl Commands {
    pub fn new(app: &App) -> Self {
        let strategies = Arc::new(Executor::new(app.store.clone(), app.metrics.clone()));
        let markets = Arc::new(Executor::new(app.store.clone(), app.metrics.clone()));
        Commands {
            portfolio_facts: PortfolioFactSource {
                strategies: strategies.clone(),
                markets: markets.clone(),
            },
            strategies,
            portfolios: Executor::new(app.store.clone(), app.metrics.clone()),
            markets,
        }
    }

    /// Follows the strategy and market subjects on `client`, so that cached strategies and
    /// marks (facts of portfolio decisions) are caught up as soon as they change, and not read
    /// from the stream for every signal while they do not. `client` must be the connection
    /// the commands come on (see [`crate::repo::Repo::follow`]).
    ///
    /// # Errors
    /// When the subscriptions fail.
    pub async fn follow_facts(
        &self,
        client: &async_nats::Client,
        subjects: &crate::Subjects,
    ) -> Result<(), async_nats::SubscribeError> {
        let strategies = client
            .subscribe(subjects.aggregate(AggregateType::Strategy, "*"))
            .await?;
        self.strategies.repo().follow(strategies, client);
        let markets = client
            .subscribe(subjects.aggregate(AggregateType::Market, "*"))
            .await?;
        self.markets.repo().follow(markets, client);
        Ok(())
    }

    /// Drops every cached aggregate (see [`watch_stream`]); returns how many.
    pub fn forget_cached(&self) -> usize {
        self.strategies.repo().forget_all()
            + self.portfolios.repo().forget_all()
            + self.markets.repo().forget_all()
    }

    /// Parses, decides and stores one command.
    ///
    /// # Errors
    /// [`ApiError`] as API.md says; nothing is stored then, but for `unavailable` after an
    /// append that went unanswered (see [`crate::command::Executor::execute`]).
    pub async fn execute(&self, endpoint: Endpoint, body: &[u8]) -> Result<Value, ApiError> {
        let mut parsed = parse_command(endpoint, body)?;
        if let Target::Strategy {
            strategy_id: None, ..
        } = &parsed.target
        {
            parsed.target.set_strategy_id(Uuid::now_v7().to_string());
        }
        let common = &parsed.common;
        if let Some(c) = &common.command_id {
            Span::current().record("command_id", tracing::field::display(c));
        }
        match &parsed.target {
            Target::Strategy {
                strategy_id,
                command,
            } => {
                let id = strategy_id.as_deref().unwrap_or_default();
                Span::current().record("aggregate_id", id);
                self.strategies.execute(id, common, command, &NoFacts).await
            }
            Target::Portfolio {
                portfolio_id,
                command,
            } => {
                Span::current().record("aggregate_id", portfolio_id.as_str());
                self.portfolios
                    .execute(portfolio_id, common, command, &self.portfolio_facts)
                    .await
            }
            Target::Market { symbol, command } => {
                Span::current().record("aggregate_id", symbol.as_str());
                self.markets
                    .execute(symbol, common, command, &NoFacts)
                    .await
            }
        }
    }
}

/// Whether a worker serving `endpoints` decides portfolio commands, the only ones that read
/// facts (strategies, marks): the others need not follow their changes.
fn decides_portfolios(endpoints: &[Endpoint]) -> bool {
    endpoints
        .iter()
        .any(|e| matches!(e, Endpoint::PortfolioUpdate | Endpoint::SignalExecute))
}

/// The read models events are projected into.
pub const PROJECTIONS: [&str; 2] = ["portfolio", "strategy"];

/// The read models whose projectors consume the events an endpoint appends (`immediate` mode
/// waits for these): the portfolio projector reads the whole stream, the strategy projector
/// the strategy subjects only (`nats/consumers/`).
fn consumers_of(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::StrategyCreate | Endpoint::StrategyUpdate | Endpoint::StrategyDelete => {
            &PROJECTIONS
        }
        Endpoint::PortfolioUpdate | Endpoint::MarketPrice | Endpoint::SignalExecute => {
            &["portfolio"]
        }
    }
}

struct CommandHandler {
    commands: Commands,
    /// `immediate` mode: announcements of the projectors, and how long to wait for them.
    immediate: Option<(Progress, Duration)>,
    metrics: Metrics,
}

impl Handler for CommandHandler {
    async fn handle(&self, endpoint: &str, msg: &Message) -> Result<Value, ApiError> {
        let ep = Endpoint::ALL
            .into_iter()
            .find(|e| service::endpoint_name(e.name()) == endpoint)
            .ok_or_else(|| ApiError::not_found(format!("no command endpoint {endpoint}")))?;
        let mut reply = self.commands.execute(ep, &msg.payload).await?;
        let seq = reply["stream_seq"].as_u64();
        if let Some(seq) = seq {
            Span::current().record("stream_seq", seq);
        }
        if let (Some((progress, timeout)), Some(seq)) = (&self.immediate, seq) {
            let projected = progress
                .wait_announced(consumers_of(ep), seq, *timeout)
                .await;
            if !projected {
                // Counted for an operator (a projector down or slow shows here first).
                self.metrics.add("not_projected", 1);
                debug!(
                    timeout_ms = timeout.as_millis() as u64,
                    "not projected within CH_IMMEDIATE_TIMEOUT_MS: replying projected: false"
                );
            }
            reply["projected"] = Value::Bool(projected);
        }
        Ok(reply)
    }
}

/// The subjects of JetStream's advisories of the event stream being created, deleted or
/// updated.
fn stream_advisories(subjects: &crate::Subjects) -> String {
    format!("$JS.EVENT.ADVISORY.STREAM.*.{}", subjects.stream_name())
}

/// How often [`watch_stream`] looks whether the connection was established again.
const RECONNECT_CHECK: Duration = Duration::from_secs(1);

/// Drops the worker's cached aggregates whenever the event stream is deleted or made anew (an
/// operator's `nats stream rm` and `chctl setup`, say): their states, sequences and command
/// ids were read from the old stream, and the new one numbers its events from 1 again, so
/// a catch-up from a cached sequence would miss the new events (a strategy decided on its old
/// rules) and a cached command id would name another event. JetStream's advisories tell; as a
/// reconnect may have lost one, the stream's creation time is also read again after each
/// reconnect of `connection` (the advisories' connection), and a later one than the stream
/// the worker knows drops the caches too. Ends with the handler, or the advisories'
/// subscription.
async fn watch_stream(
    handler: std::sync::Weak<CommandHandler>,
    mut advisories: async_nats::Subscriber,
    store: crate::eventstore::EventStore,
    connection: Arc<async_nats::Statistics>,
) {
    use futures::StreamExt;
    use std::sync::atomic::Ordering;
    let connects = || connection.connects.load(Ordering::Relaxed);
    let (mut known, mut seen_connects) = (store.opened_created(), connects());
    let mut tick = tokio::time::interval(RECONNECT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            msg = advisories.next() => match msg {
                None => return,
                // `$JS.EVENT.ADVISORY.STREAM.<action>.<stream>`
                Some(m) => match m.subject.split('.').nth(4) {
                    Some(action @ ("CREATED" | "DELETED")) => action.to_ascii_lowercase(),
                    _ => continue,
                },
            },
            _ = tick.tick() => {
                if connects() == seen_connects {
                    if handler.strong_count() == 0 {
                        return;
                    }
                    continue;
                }
                // Looked at again on the next tick should the stream not answer now.
                let now = connects();
                match store.last_seq_and_created().await {
                    Ok((_, created)) => {
                        seen_connects = now;
                        if created == known {
                            continue;
                        }
                        "created while disconnected".into()
                    }
                    Err(_) => continue,
                }
            }
        };
        let Some(handler) = handler.upgrade() else {
            return;
        };
        let dropped = handler.commands.forget_cached();
        handler.metrics.add("caches_dropped", 1);
        warn!(
            stream = %store.subjects().stream_name(),
            event = %why,
            dropped,
            "the event stream was deleted or made anew: cached aggregates dropped"
        );
        if let Ok((_, created)) = store.last_seq_and_created().await {
            known = created;
        }
    }
}

/// A command worker's whole life: serves `endpoints` as `worker` until SIGTERM or Ctrl-C
/// (see [`crate::app::boxed_main`]).
#[inline(never)]
pub fn main_future(
    cfg: crate::Config,
    worker: &'static str,
    endpoints: &'static [Endpoint],
) -> crate::app::MainFuture {
    crate::app::boxed_main(cfg, worker, move |app, shutdown| {
        run(app, endpoints, shutdown)
    })
}

/// Serves `endpoints` until `shutdown`.
///
/// # Errors
/// When the service cannot be registered.
pub async fn run(
    app: App,
    endpoints: &[Endpoint],
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let spec = app.service_spec(
        "CipherHorizon commands (API.md)",
        endpoints
            .iter()
            .map(|e| (e.name(), app.subjects.command(e.name()))),
    );
    let immediate = if app.cfg.sync == SyncMode::Immediate {
        // There from the start, at 0, as the projectors' gauges are.
        app.metrics.gauge("not_projected", 0);
        let progress = Progress::subscribe(&app.client, &app.subjects, &PROJECTIONS).await?;
        Some((progress, app.cfg.immediate_timeout))
    } else {
        None
    };
    let commands = Commands::new(&app);
    if decides_portfolios(endpoints) {
        // On the service's connection, which the requests come on: a change's notice is then
        // there before any request sent after its reply (in the drain at shutdown its notices
        // stop with the requests; the facts' age bound covers the requests still in hand).
        commands.follow_facts(&app.intake, &app.subjects).await?;
    }
    // On the service's connection too: the advisory of a stream made anew is then there before
    // the requests sent after it (as far as the server sends them in that order).
    let advisories = app
        .intake
        .subscribe(stream_advisories(&app.subjects))
        .await?;
    let handler = Arc::new(CommandHandler {
        commands,
        immediate,
        metrics: app.metrics.clone(),
    });
    tokio::spawn(watch_stream(
        Arc::downgrade(&handler),
        advisories,
        app.store.clone(),
        app.intake.statistics(),
    ));
    service::serve(
        app.connections(),
        spec,
        handler,
        app.metrics.clone(),
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_portfolio_workers_follow_the_facts_of_portfolio_decisions() {
        assert!(decides_portfolios(&[Endpoint::SignalExecute]));
        assert!(decides_portfolios(&[Endpoint::PortfolioUpdate]));
        assert!(decides_portfolios(&Endpoint::ALL));
        assert!(!decides_portfolios(&[Endpoint::MarketPrice]));
        assert!(!decides_portfolios(&[
            Endpoint::StrategyCreate,
            Endpoint::StrategyUpdate,
            Endpoint::StrategyDelete,
        ]));
    }
}
