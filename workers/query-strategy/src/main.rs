//! `query-strategy`: answers ch.query.strategy.list, .get and .leaderboard from the read model.
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::{anyhow, Context};
use ch_runtime::{app::App, shutdown, telemetry, Config};

fn main() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    cfg.runtime()?.block_on(run(cfg))
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    telemetry::init(cfg.log_json);
    let app = App::start(cfg, "query-strategy")
        .await
        .context("starting query-strategy")?;
    let queries = [
        ch_readmodel::workers::Query::StrategyList,
        ch_readmodel::workers::Query::StrategyGet,
        ch_readmodel::workers::Query::StrategyLeaderboard,
    ];
    ch_readmodel::workers::run_queries(app, &queries, shutdown::on_signal())
        .await
        .map_err(|e| anyhow!(e))
        .context("query-strategy failed")
}
