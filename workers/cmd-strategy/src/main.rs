//! `cmd-strategy`: answers ch.cmd.strategy.create, .update and .delete (API.md).
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
    let app = App::start(cfg, "cmd-strategy")
        .await
        .context("starting cmd-strategy")?;
    let endpoints = [
        ch_domain::request::Endpoint::StrategyCreate,
        ch_domain::request::Endpoint::StrategyUpdate,
        ch_domain::request::Endpoint::StrategyDelete,
    ];
    ch_runtime::commands::run(app, &endpoints, shutdown::on_signal())
        .await
        .map_err(|e| anyhow!(e))
        .context("cmd-strategy failed")
}
