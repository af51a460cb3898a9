//! `proj-portfolio`: projects portfolios, positions, marks, fills and round trips into PostgreSQL.
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
    let app = App::start(cfg, "proj-portfolio")
        .await
        .context("starting proj-portfolio")?;
    ch_readmodel::workers::run_projector(
        app,
        ch_readmodel::PortfolioProjection::default(),
        shutdown::on_signal(),
    )
    .await
    .map_err(|e| anyhow!(e))
    .context("proj-portfolio failed")
}
