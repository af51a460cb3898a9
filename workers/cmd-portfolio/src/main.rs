//! `cmd-portfolio`: answers ch.cmd.portfolio.update (API.md).
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::anyhow;
use ch_domain::request::Endpoint;
use ch_runtime::{app::worker_main, commands};

fn main() -> anyhow::Result<()> {
    worker_main("cmd-portfolio", |cfg| {
        commands::main_future(cfg, "cmd-portfolio", &[Endpoint::PortfolioUpdate])
    })
    .map_err(|e| anyhow!(e))
}
