//! `cmd-strategy`: answers ch.cmd.strategy.create, .update and .delete (API.md).
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::anyhow;
use ch_domain::request::Endpoint;
use ch_runtime::{app::worker_main, commands};

fn main() -> anyhow::Result<()> {
    worker_main("cmd-strategy", |cfg| {
        let endpoints = &[
            Endpoint::StrategyCreate,
            Endpoint::StrategyUpdate,
            Endpoint::StrategyDelete,
        ];
        commands::main_future(cfg, "cmd-strategy", endpoints)
    })
    .map_err(|e| anyhow!(e))
}
