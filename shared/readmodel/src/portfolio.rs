//! The `portfolio` projection: portfolios with their cash and totals, positions, marks,
//! fills, round trips and attached strategies. The accounting is not redone here: trade
//! events carry the position's state after the fill.

use ch_domain::event::Side;
use ch_domain::Event;
use ch_runtime::envelope::StoredEvent;
use ch_runtime::projector::Projection;
use rust_decimal::Decimal;
use tokio_postgres::Transaction;

pub struct PortfolioProjection;

/// Equity of a portfolio at the marks known now: cash plus each position at its mark, or at
/// its average entry price when it has none (DOMAIN.md).
pub const EQUITY_SQL: &str = "
    (SELECT pf.cash + COALESCE((
        SELECT sum(CASE WHEN m.price IS NULL THEN p.gross_entry ELSE p.quantity * m.price END)
        FROM positions p LEFT JOIN marks m ON m.symbol = p.symbol
        WHERE p.portfolio_id = pf.portfolio_id), 0)
     FROM portfolios pf WHERE pf.portfolio_id = $1)";

impl Projection for PortfolioProjection {
    fn name(&self) -> &'static str {
        "portfolio"
    }

    fn consumer_json(&self) -> &'static str {
        ch_runtime::eventstore::CONSUMER_PORTFOLIO_JSON
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        ev: &StoredEvent,
    ) -> Result<(), tokio_postgres::Error> {
        let version = ev.meta.aggregate_version as i64;
        let seq = ev.seq as i64;
        let at = ev.meta.occurred_at;
        // Every portfolio event moves the row's version.
        let touch = "UPDATE portfolios SET version = $2, updated_at = $3, last_seq = $4 WHERE portfolio_id = $1";
        match &ev.event {
            Event::PortfolioOpened(e) => {
                tx.execute(
                    "INSERT INTO portfolios (portfolio_id, user_id, name, quote_currency, fee_rate, status,
                                             version, opened_at, updated_at, last_seq)
                     VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $7, $8)
                     ON CONFLICT (portfolio_id) DO NOTHING",
                    &[&e.portfolio_id, &e.user_id, &e.name, &e.quote_currency, &e.fee_rate, &version, &at, &seq],
                )
                .await?;
            }
            Event::FundsDeposited(e) => {
                flow(tx, &e.portfolio_id, e.amount, e.cash_after, ev).await?
            }
            Event::FundsWithdrawn(e) => {
                flow(tx, &e.portfolio_id, -e.amount, e.cash_after, ev).await?
            }
            Event::PortfolioRenamed(e) => {
                tx.execute(
                    "UPDATE portfolios SET name = $5, version = $2, updated_at = $3, last_seq = $4
                     WHERE portfolio_id = $1",
                    &[&e.portfolio_id, &version, &at, &seq, &e.name],
                )
                .await?;
            }
            Event::StrategyAttached(e) => {
                tx.execute(
                    "INSERT INTO portfolio_strategies (portfolio_id, strategy_id, attached_at)
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&e.portfolio_id, &e.strategy_id, &at],
                )
                .await?;
                tx.execute(touch, &[&e.portfolio_id, &version, &at, &seq])
                    .await?;
            }
            Event::StrategyDetached(e) => {
                tx.execute(
                    "DELETE FROM portfolio_strategies WHERE portfolio_id = $1 AND strategy_id = $2",
                    &[&e.portfolio_id, &e.strategy_id],
                )
                .await?;
                tx.execute(touch, &[&e.portfolio_id, &version, &at, &seq])
                    .await?;
            }
            Event::PortfolioClosed(e) => {
                tx.execute(
                    "UPDATE portfolios SET status = 'closed', version = $2, updated_at = $3, last_seq = $4
                     WHERE portfolio_id = $1",
                    &[&e.portfolio_id, &version, &at, &seq],
                )
                .await?;
            }
            Event::TradeSignalRejected(e) => {
                tx.execute(
                    "UPDATE portfolios SET rejected_signals = rejected_signals + 1, version = $2,
                            updated_at = $3, last_seq = $4
                     WHERE portfolio_id = $1",
                    &[&e.portfolio_id, &version, &at, &seq],
                )
                .await?;
            }
            Event::TradeExecuted(e) => {
                tx.execute(
                    "UPDATE portfolios SET cash = $5, realized_pnl = realized_pnl + $6, fees_paid = fees_paid + $7,
                            fill_count = fill_count + 1, version = $2, updated_at = $3, last_seq = $4
                     WHERE portfolio_id = $1",
                    &[&e.portfolio_id, &version, &at, &seq, &e.cash_after, &e.realized_pnl, &e.fee],
                )
                .await?;
                if e.position_after.is_zero() {
                    tx.execute(
                        "DELETE FROM positions WHERE portfolio_id = $1 AND symbol = $2",
                        &[&e.portfolio_id, &e.symbol],
                    )
                    .await?;
                } else {
                    tx.execute(
                        "INSERT INTO positions (portfolio_id, symbol, quantity, cost_basis, gross_entry)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (portfolio_id, symbol) DO UPDATE
                         SET quantity = $3, cost_basis = $4, gross_entry = $5",
                        &[&e.portfolio_id, &e.symbol, &e.position_after, &e.cost_basis_after, &e.gross_entry_after],
                    )
                    .await?;
                }
                tx.execute(
                    "INSERT INTO trades (trade_id, portfolio_id, strategy_id, symbol, side, quantity, price, fee,
                                         realized_pnl, cash_after, position_after, at, stream_seq)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                     ON CONFLICT (trade_id) DO NOTHING",
                    &[
                        &e.trade_id, &e.portfolio_id, &e.strategy_id, &e.symbol, &e.side.as_str(), &e.quantity,
                        &e.price, &e.fee, &e.realized_pnl, &e.cash_after, &e.position_after, &at, &seq,
                    ],
                )
                .await?;
                round_trip(tx, e, ev).await?;
            }
            Event::MarketPriceRecorded(e) => {
                tx.execute(
                    "INSERT INTO marks (symbol, price, at, last_seq) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (symbol) DO UPDATE SET price = $2, at = $3, last_seq = $4
                     WHERE marks.at <= $3",
                    &[&e.symbol, &e.price, &at, &seq],
                )
                .await?;
            }
            Event::StrategyCreated(_) | Event::StrategyUpdated(_) | Event::StrategyDeleted(_) => {}
        }
        Ok(())
    }

    async fn reset(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        tx.batch_execute(
            "TRUNCATE portfolios, positions, marks, trades, round_trips, portfolio_strategies",
        )
        .await
    }
}

/// An external flow (deposit > 0, withdrawal < 0): chains the time-weighted NAV index with the
/// equity just before the flow, then records the equity just after it.
async fn flow(
    tx: &Transaction<'_>,
    portfolio_id: &str,
    signed_amount: Decimal,
    cash_after: Decimal,
    ev: &StoredEvent,
) -> Result<(), tokio_postgres::Error> {
    let version = ev.meta.aggregate_version as i64;
    let seq = ev.seq as i64;
    let at = ev.meta.occurred_at;
    let sql = format!(
        "WITH eq AS (SELECT {EQUITY_SQL} AS e)
         UPDATE portfolios SET
            nav_at_flow = CASE WHEN equity_at_flow > 0
                               THEN round(nav_at_flow * (SELECT e FROM eq) / equity_at_flow, 20)
                               ELSE nav_at_flow END,
            equity_at_flow = (SELECT e FROM eq) + $5,
            cash = $6,
            net_deposits = net_deposits + $5,
            first_deposit_at = CASE WHEN $5 > 0 THEN COALESCE(first_deposit_at, $3) ELSE first_deposit_at END,
            version = $2, updated_at = $3, last_seq = $4
         WHERE portfolio_id = $1"
    );
    tx.execute(
        &sql,
        &[
            &portfolio_id,
            &version,
            &at,
            &seq,
            &signed_amount,
            &cash_after,
        ],
    )
    .await?;
    Ok(())
}

/// Round trips, flat to flat: a buy from flat opens one; sells add their realized PnL; the
/// sell that makes the position flat closes it.
async fn round_trip(
    tx: &Transaction<'_>,
    e: &ch_domain::event::TradeExecuted,
    ev: &StoredEvent,
) -> Result<(), tokio_postgres::Error> {
    let seq = ev.seq as i64;
    let at = ev.meta.occurred_at;
    match e.side {
        Side::Buy => {
            let updated = tx
                .execute(
                    "UPDATE round_trips SET fees = fees + $3
                     WHERE portfolio_id = $1 AND symbol = $2 AND closed_at IS NULL",
                    &[&e.portfolio_id, &e.symbol, &e.fee],
                )
                .await?;
            if updated == 0 {
                tx.execute(
                    "INSERT INTO round_trips (portfolio_id, symbol, opened_seq, opened_at, fees)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&e.portfolio_id, &e.symbol, &seq, &at, &e.fee],
                )
                .await?;
            }
        }
        Side::Sell => {
            let closed_at = e.position_after.is_zero().then_some(at);
            tx.execute(
                "UPDATE round_trips SET pnl = pnl + $3, fees = fees + $4, closed_at = $5
                 WHERE portfolio_id = $1 AND symbol = $2 AND closed_at IS NULL",
                &[
                    &e.portfolio_id,
                    &e.symbol,
                    &e.realized_pnl,
                    &e.fee,
                    &closed_at,
                ],
            )
            .await?;
        }
    }
    Ok(())
}
