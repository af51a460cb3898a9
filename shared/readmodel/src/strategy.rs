//! The `strategy` projection: one row per strategy.

use ch_domain::Event;
use ch_runtime::envelope::StoredEvent;
use ch_runtime::projector::Projection;
use deadpool_postgres::Transaction;
use serde_json::to_value;

/// The projection's tables: what its reset empties, and what a query's snapshot locks before
/// it reads the checkpoint (see `queries::snapshot`).
pub const TABLES: &[&str] = &["strategies"];

pub struct StrategyProjection;

impl Projection for StrategyProjection {
    fn name(&self) -> &'static str {
        "strategy"
    }

    fn consumer_json(&self) -> &'static str {
        ch_runtime::eventstore::CONSUMER_STRATEGY_JSON
    }

    fn schema_known(&self) -> Option<i32> {
        crate::newest_migration()
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type.starts_with("Strategy")
            && !matches!(event_type, "StrategyAttached" | "StrategyDetached")
    }

    async fn apply_batch(
        &self,
        tx: &Transaction<'_>,
        events: &[StoredEvent],
        _after: u64,
    ) -> Result<(), tokio_postgres::Error> {
        // Strategy events are rare: one statement each is fine; the rest are skipped.
        for ev in events {
            apply(tx, ev).await?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        tx.batch_execute(&format!("TRUNCATE {}", TABLES.join(", ")))
            .await
    }
}

async fn apply(tx: &Transaction<'_>, ev: &StoredEvent) -> Result<(), tokio_postgres::Error> {
    {
        let version = ev.meta.aggregate_version as i64;
        let seq = ev.seq as i64;
        let at = ev.meta.occurred_at;
        match &ev.event {
            Event::StrategyCreated(e) => {
                let rules = to_value(&e.rules).expect("rules serialize");
                let risk = to_value(&e.risk_profile).expect("risk profile serializes");
                tx.execute(
                    "INSERT INTO strategies (strategy_id, user_id, name, status, rules, risk_profile,
                                             version, created_at, updated_at, last_seq)
                     VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $7, $8)
                     ON CONFLICT (strategy_id) DO NOTHING",
                    &[&e.strategy_id, &e.user_id, &e.name, &rules, &risk, &version, &at, &seq],
                )
                .await?;
            }
            Event::StrategyUpdated(e) => {
                let rules = e
                    .rules
                    .as_ref()
                    .map(|r| to_value(r).expect("rules serialize"));
                let risk = e
                    .risk_profile
                    .as_ref()
                    .map(|r| to_value(r).expect("risk profile serializes"));
                tx.execute(
                    "UPDATE strategies SET name = COALESCE($2, name), rules = COALESCE($3, rules),
                            risk_profile = COALESCE($4, risk_profile), version = $5, updated_at = $6,
                            last_seq = $7
                     WHERE strategy_id = $1",
                    &[&e.strategy_id, &e.name, &rules, &risk, &version, &at, &seq],
                )
                .await?;
            }
            Event::StrategyDeleted(e) => {
                tx.execute(
                    "UPDATE strategies SET status = 'deleted', version = $2, updated_at = $3, last_seq = $4
                     WHERE strategy_id = $1",
                    &[&e.strategy_id, &version, &at, &seq],
                )
                .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
