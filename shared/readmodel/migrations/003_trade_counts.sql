-- Closed round trips and the winning ones (pnl > 0) per portfolio, kept on its row by the
-- projector: the performance query reads them instead of counting round trips on every request.
ALTER TABLE portfolios
    ADD COLUMN trade_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN win_count   bigint NOT NULL DEFAULT 0;

UPDATE portfolios p SET trade_count = t.closed, win_count = t.wins
FROM (SELECT portfolio_id,
             count(*) FILTER (WHERE closed_at IS NOT NULL) AS closed,
             count(*) FILTER (WHERE closed_at IS NOT NULL AND pnl > 0) AS wins
      FROM round_trips GROUP BY portfolio_id) t
WHERE t.portfolio_id = p.portfolio_id;
