//! `query-portfolio`: answers ch.query.portfolio.performance and ch.query.portfolio.analysis from the read model.
//!
//! Configuration: the `CH_*` environment variables (README). SIGTERM or Ctrl-C drains it.

use anyhow::anyhow;
use ch_readmodel::workers::{queries_main, Query};
use ch_runtime::app::worker_main;

fn main() -> anyhow::Result<()> {
    worker_main("query-portfolio", |cfg| {
        let queries = &[Query::PortfolioPerformance, Query::PortfolioAnalysis];
        queries_main(cfg, "query-portfolio", queries)
    })
    .map_err(|e| anyhow!(e))
}
