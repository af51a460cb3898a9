//! `proj-strategy`: projects strategies into PostgreSQL.
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
    let app = App::start(cfg, "proj-strategy")
        .await
        .context("starting proj-strategy")?;
    ch_readmodel::workers::run_projector(
        app,
        ch_readmodel::StrategyProjection,
        shutdown::on_signal(),
    )
    .await
    .map_err(|e| anyhow!(e))
    .context("proj-strategy failed")
}
