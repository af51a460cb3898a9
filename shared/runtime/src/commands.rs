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

    /// Drops every cached aggregate (see [`StreamWatch`]); returns how many.
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
    watch: StreamWatch,
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
        self.heed_advisories();
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

/// How often [`watch_stream`] takes the advisories received while no command came...
const ADVISORY_DRAIN: Duration = Duration::from_millis(100);
/// ...and looks whether the connection was established again (every this many drains).
const RECONNECT_CHECK_EVERY: u32 = 10;

/// What tells a command worker that its event stream was deleted or made anew (an operator's
/// `nats stream rm` and `chctl setup`, say): JetStream's advisories of the stream, on the
/// service's connection. The cached aggregates (states, sequences, command ids) were read
/// from the old stream, and the new one numbers its events from 1 again: a catch-up from a
/// cached sequence would miss the new events (a strategy decided on its old rules), and a
/// cached command id would name another event. Every command first takes the advisories
/// received (never waiting), so that one the server sent before a request is heeded before
/// that request is decided; [`watch_stream`] takes them when no command comes.
struct StreamWatch {
    advisories: std::sync::Mutex<Option<async_nats::Subscriber>>,
    /// The caches were dropped on an advisory: the stream's creation time is to be read again.
    recheck: std::sync::atomic::AtomicBool,
}

impl StreamWatch {
    /// The last deletion or creation among the advisories received, taking them all.
    fn received(&self) -> Option<&'static str> {
        use futures::{FutureExt, StreamExt};
        let mut guard = self.advisories.lock().expect("advisories lock poisoned");
        let mut action = None;
        while let Some(next) = guard.as_mut().and_then(|sub| sub.next().now_or_never()) {
            let Some(m) = next else {
                // The subscription ended (the drain at shutdown).
                *guard = None;
                break;
            };
            // `$JS.EVENT.ADVISORY.STREAM.<action>.<stream>`
            match m.subject.split('.').nth(4) {
                Some("CREATED") => action = Some("created"),
                Some("DELETED") => action = Some("deleted"),
                _ => {}
            }
        }
        action
    }
}

impl CommandHandler {
    /// Takes the stream's advisories received; drops the caches if one says it was deleted or
    /// created.
    fn heed_advisories(&self) {
        if let Some(action) = self.watch.received() {
            self.drop_caches(action);
            self.watch
                .recheck
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn drop_caches(&self, why: &str) {
        let dropped = self.commands.forget_cached();
        self.metrics.add("caches_dropped", 1);
        warn!(
            event = why,
            dropped, "the event stream was deleted or made anew: cached aggregates dropped"
        );
    }
}

/// Takes the stream's advisories while no command comes (see [`StreamWatch`]), and since a
/// reconnect may have lost one, reads the stream's creation time again after each reconnect
/// of `connection` (the advisories' connection): a later one than the stream the worker knows
/// drops the caches too. Ends with the handler.
async fn watch_stream(
    handler: std::sync::Weak<CommandHandler>,
    store: crate::eventstore::EventStore,
    connection: Arc<async_nats::Statistics>,
) {
    use std::sync::atomic::Ordering;
    let connects = || connection.connects.load(Ordering::Relaxed);
    let (mut known, mut seen_connects) = (store.opened_created(), connects());
    // The stream there now is one set-up did not make (see `EventStore::open`): looked at
    // again at each check until it is mended.
    let mut unusable = false;
    let mut tick = tokio::time::interval(ADVISORY_DRAIN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        tick.tick().await;
        n = n.wrapping_add(1);
        let Some(handler) = handler.upgrade() else {
            return;
        };
        handler.heed_advisories();
        let reconnected = connects() != seen_connects;
        let recheck = handler.watch.recheck.load(Ordering::Relaxed);
        if !(reconnected || recheck || unusable) || !n.is_multiple_of(RECONNECT_CHECK_EVERY) {
            continue;
        }
        // Looked at again on a later tick should the stream not answer now (or be gone).
        let now = connects();
        if let Ok((_, created)) = store.last_seq_and_created().await {
            seen_connects = now;
            handler.watch.recheck.store(false, Ordering::Relaxed);
            // Dropped already for the advisory that told of it.
            if created != known && !recheck {
                handler.drop_caches("created while disconnected");
            }
            if created != known || unusable {
                // Made anew by hand, it may lack what every command needs (direct gets): said
                // (and shown in the stats, `stream_unusable`), rather than only as each
                // command's `unavailable` after 15 s.
                match store.unusable_now().await {
                    Some(why) => {
                        if !unusable {
                            tracing::error!(
                                "the event stream made anew is not as `chctl setup` makes it: \
                                 {why}; commands fail until it is"
                            );
                        }
                        unusable = true;
                    }
                    None => {
                        if unusable {
                            tracing::info!("the event stream is usable again");
                        }
                        unusable = false;
                    }
                }
                handler
                    .metrics
                    .gauge("stream_unusable", i64::from(unusable));
            }
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
    // On the service's connection, which the requests come on: an advisory the server sent
    // before a request is there when that request is handled.
    let advisories = app
        .intake
        .subscribe(stream_advisories(&app.subjects))
        .await?;
    // There from the start, at 0, as the projectors' gauges are.
    app.metrics.gauge("caches_dropped", 0);
    app.metrics.gauge("stream_unusable", 0);
    let handler = Arc::new(CommandHandler {
        commands,
        watch: StreamWatch {
            advisories: std::sync::Mutex::new(Some(advisories)),
            recheck: std::sync::atomic::AtomicBool::new(false),
        },
        immediate,
        metrics: app.metrics.clone(),
    });
    tokio::spawn(watch_stream(
        Arc::downgrade(&handler),
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
