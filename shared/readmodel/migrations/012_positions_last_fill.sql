-- Each position's last fill (its stream sequence): the exit-trigger worker reads it for every
-- price instead of looking through the portfolio's trades since the round trip opened (a scan
-- that grew with every fill of a long-open position, in every symbol). Filled in from the
-- trades, then required: a projector of an older release, which would leave it behind, fails
-- its batches with fills until it is replaced, rather than misleading the exit triggers.
ALTER TABLE positions ADD COLUMN last_fill_seq bigint;
UPDATE positions p
   SET last_fill_seq = COALESCE((SELECT max(t.stream_seq) FROM trades t
                                  WHERE t.portfolio_id = p.portfolio_id AND t.symbol = p.symbol), 0);
ALTER TABLE positions ALTER COLUMN last_fill_seq SET NOT NULL;
