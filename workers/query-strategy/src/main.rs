//! `query-strategy`: answers ch.query.strategy.list, .get and .leaderboard from the read model.
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::anyhow;
use ch_readmodel::workers::{queries_main, Query};
use ch_runtime::app::worker_main;

fn main() -> anyhow::Result<()> {
    worker_main("query-strategy", |cfg| {
        let queries = &[
            Query::StrategyList,
            Query::StrategyGet,
            Query::StrategyLeaderboard,
        ];
        queries_main(cfg, "query-strategy", queries)
    })
    .map_err(|e| anyhow!(e))
}
