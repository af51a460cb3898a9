//! `exit-triggers`: follows market prices and sends the sell of a position whose stop loss,
//! take profit or trailing stop fires (DOMAIN.md, "Exit triggers"), through ch.cmd.signal.execute.
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
    let app = App::start(cfg, ch_readmodel::exits::WORKER)
        .await
        .context("starting exit-triggers")?;
    ch_readmodel::exits::run(app, shutdown::on_signal())
        .await
        .map_err(|e| anyhow!(e))
        .context("exit-triggers failed")
}
