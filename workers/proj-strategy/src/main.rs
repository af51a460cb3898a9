//! `proj-strategy`: projects strategies into PostgreSQL.
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::anyhow;
use ch_runtime::app::worker_main;

fn main() -> anyhow::Result<()> {
    worker_main(
        "proj-strategy",
        ch_readmodel::workers::strategy_projector_main,
    )
    .map_err(|e| anyhow!(e))
}
