-- Figures per strategy for the leaderboard, kept by the portfolio projector as it folds the
-- fills (the strategy of each fill; a round trip counts for the strategy whose sell closed
-- it). The leaderboard summed every trade and round trip of every user to rank one user's
-- strategies: its time grew with the whole history, not with the user's strategies.
CREATE TABLE strategy_stats (
    strategy_id  text PRIMARY KEY,
    realized_pnl numeric NOT NULL DEFAULT 0,
    fees_paid    numeric NOT NULL DEFAULT 0,
    fill_count   bigint NOT NULL DEFAULT 0,
    trade_count  bigint NOT NULL DEFAULT 0,
    win_count    bigint NOT NULL DEFAULT 0
);

-- The figures of what was folded before.
INSERT INTO strategy_stats (strategy_id, realized_pnl, fees_paid, fill_count)
SELECT strategy_id, sum(realized_pnl), sum(fee), count(*) FROM trades GROUP BY strategy_id;

INSERT INTO strategy_stats AS s (strategy_id, trade_count, win_count)
SELECT strategy_id, count(*), count(*) FILTER (WHERE pnl > 0)
FROM round_trips WHERE closed_at IS NOT NULL AND strategy_id IS NOT NULL GROUP BY strategy_id
ON CONFLICT (strategy_id) DO UPDATE
SET trade_count = EXCLUDED.trade_count, win_count = EXCLUDED.win_count;
