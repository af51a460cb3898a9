//! CipherHorizon's read models in PostgreSQL: the schema (migrations), how each projection
//! applies events, and the SQL behind each query.
//!
//! Two projections share one schema: `portfolio` (portfolios, positions, marks, trades,
//! round trips, attachments) and `strategy` (strategies). Each moves its own checkpoint.

pub mod analysis;
pub mod exits;
pub mod portfolio;
pub mod queries;
pub mod strategy;
pub mod workers;

use ch_runtime::pg::Migration;
use rust_decimal::Decimal;

pub use portfolio::PortfolioProjection;
pub use strategy::StrategyProjection;

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "read_models",
        sql: include_str!("../migrations/001_read_models.sql"),
    },
    Migration {
        version: 2,
        name: "history",
        sql: include_str!("../migrations/002_history.sql"),
    },
    Migration {
        version: 3,
        name: "trade_counts",
        sql: include_str!("../migrations/003_trade_counts.sql"),
    },
    Migration {
        version: 4,
        name: "fewer_index_writes",
        sql: include_str!("../migrations/004_fewer_index_writes.sql"),
    },
    Migration {
        version: 5,
        name: "trades_by_portfolio",
        sql: include_str!("../migrations/005_trades_by_portfolio.sql"),
    },
    Migration {
        version: 6,
        name: "fills_carry_positions",
        sql: include_str!("../migrations/006_fills_carry_positions.sql"),
    },
    Migration {
        version: 7,
        name: "round_trip_rows",
        sql: include_str!("../migrations/007_round_trip_rows.sql"),
    },
];

/// Plain-notation string of a decimal as replies carry it (`"14990"`, not `"14990.000"`).
pub fn plain(d: Decimal) -> String {
    d.normalize().to_string()
}
