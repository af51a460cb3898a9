//! `cmd-portfolio`: answers ch.cmd.portfolio.update (API.md).
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
    let app = App::start(cfg, "cmd-portfolio")
        .await
        .context("starting cmd-portfolio")?;
    let endpoints = [ch_domain::request::Endpoint::PortfolioUpdate];
    ch_runtime::commands::run(app, &endpoints, shutdown::on_signal())
        .await
        .map_err(|e| anyhow!(e))
        .context("cmd-portfolio failed")
}
