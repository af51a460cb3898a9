//! CipherHorizon's read models in PostgreSQL: the schema (migrations), how each projection
//! applies events, and the SQL behind each query.
//!
//! Two projections share one schema: `portfolio` (portfolios, positions, marks, trades,
//! round trips, attachments, the flows' history, prices) and `strategy` (strategies). Each moves its own checkpoint.

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

/// `migrations![version "file prefix" "name", ...]`: each one is `migrations/<prefix>_<name>.sql`.
macro_rules! migrations {
    ($($version:literal $prefix:literal $name:literal),* $(,)?) => {
        &[$(Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../migrations/", $prefix, "_", $name, ".sql")),
        }),*]
    };
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = migrations![
    1 "001" "read_models",
    2 "002" "history",
    3 "003" "trade_counts",
    4 "004" "fewer_index_writes",
    5 "005" "trades_by_portfolio",
    6 "006" "fills_carry_positions",
    7 "007" "round_trip_rows",
    8 "008" "stream",
    9 "009" "fills_by_strategy",
    10 "010" "positions_by_symbol",
    11 "011" "stream_created",
    12 "012" "positions_last_fill",
    13 "013" "portfolio_strategies_seq",
];

/// The newest migration of [`MIGRATIONS`]: a schema past it is a newer release's.
pub fn newest_migration() -> Option<i32> {
    MIGRATIONS.iter().map(|m| m.version).max()
}

/// A win rate as replies carry it: `wins / closed` to 10 places, none without a closed round
/// trip (the performance query, the strategy's, and what `chctl bench` checks them against).
pub fn win_rate(wins: impl Into<Decimal>, closed: impl Into<Decimal>) -> Option<Decimal> {
    let closed = closed.into();
    (!closed.is_zero()).then(|| (wins.into() / closed).round_dp(10))
}

/// Plain-notation string of a decimal as replies carry it (`"14990"`, not `"14990.000"`).
pub fn plain(d: Decimal) -> String {
    d.normalize().to_string()
}
