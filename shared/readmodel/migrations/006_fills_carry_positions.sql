-- A fill's row carries the position's cost basis and gross entry after it, as the event does:
-- with the cash and quantity after it, that is the state the history row written for every fill
-- repeated (a second row, a second index entry and a JSON document per fill, half of a
-- rebuild's writes). The analysis now folds the state after each fill from the fills, and
-- `portfolio_history` keeps the flows (deposits and withdrawals) only.
ALTER TABLE trades
    ADD COLUMN cost_basis_after  numeric,
    ADD COLUMN gross_entry_after numeric;

UPDATE trades t
SET cost_basis_after  = COALESCE((h.positions -> t.symbol ->> 'cost_basis')::numeric, 0),
    gross_entry_after = COALESCE((h.positions -> t.symbol ->> 'gross_entry')::numeric, 0)
FROM portfolio_history h
WHERE h.portfolio_id = t.portfolio_id AND h.stream_seq = t.stream_seq;

UPDATE trades SET cost_basis_after = 0, gross_entry_after = 0 WHERE cost_basis_after IS NULL;

ALTER TABLE trades
    ALTER COLUMN cost_basis_after SET NOT NULL,
    ALTER COLUMN gross_entry_after SET NOT NULL;

DELETE FROM portfolio_history WHERE flow = 0;
