-- A round trip's row is now written when it opens and when it closes: while it is open, its
-- pnl and fees are those of its first fill, and the projector sums the later fills from the
-- trades (a row write per fill was a fifth of a live batch's writes). Rows of open trips
-- written before carried the sums so far: set them as the projector writes them now, so that
-- a rebuild's rows equal these.
UPDATE round_trips rt
SET pnl = 0, fees = t.fee
FROM trades t
WHERE rt.closed_at IS NULL AND t.portfolio_id = rt.portfolio_id AND t.stream_seq = rt.opened_seq;

-- The projector is the only writer of positions and portfolios, and writes a position with its
-- portfolio in one transaction: the foreign key guarded nothing the projector does not, and its
-- check (a lookup of the portfolio, locking its row) cost every new position.
ALTER TABLE positions DROP CONSTRAINT IF EXISTS positions_portfolio_id_fkey;
