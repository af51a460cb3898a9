//! `query-portfolio`: answers ch.query.portfolio.performance and ch.query.portfolio.analysis from the read model.
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
    let app = App::start(cfg, "query-portfolio")
        .await
        .context("starting query-portfolio")?;
    let queries = [
        ch_readmodel::workers::Query::PortfolioPerformance,
        ch_readmodel::workers::Query::PortfolioAnalysis,
    ];
    ch_readmodel::workers::run_queries(app, &queries, shutdown::on_signal())
        .await
        .map_err(|e| anyhow!(e))
        .context("query-portfolio failed")
}
