//! `exit-triggers`: follows market prices and sends the sell of a position whose stop loss,
//! take profit or trailing stop fires (DOMAIN.md, "Exit triggers"), through ch.cmd.signal.execute.
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::anyhow;
use ch_runtime::app::worker_main;

fn main() -> anyhow::Result<()> {
    worker_main("exit-triggers", ch_readmodel::exits::main_future).map_err(|e| anyhow!(e))
}
