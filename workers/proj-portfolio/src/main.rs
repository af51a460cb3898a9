//! `proj-portfolio`: projects portfolios, positions, marks, fills, round trips, attachments,
//! the flows' history and prices into PostgreSQL.
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::anyhow;
use ch_runtime::app::worker_main;

fn main() -> anyhow::Result<()> {
    worker_main(
        "proj-portfolio",
        ch_readmodel::workers::portfolio_projector_main,
    )
    .map_err(|e| anyhow!(e))
}
