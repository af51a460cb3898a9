//! `cmd-signal`: answers ch.cmd.signal.execute: trade signals checked against risk (API.md, DOMAIN.md).
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::anyhow;
use ch_domain::request::Endpoint;
use ch_runtime::{app::worker_main, commands};

fn main() -> anyhow::Result<()> {
    worker_main("cmd-signal", |cfg| {
        commands::main_future(cfg, "cmd-signal", &[Endpoint::SignalExecute])
    })
    .map_err(|e| anyhow!(e))
}
