-- Fills are read by portfolio (and time) and by strategy, never by trade id, and the
-- checkpoint applies each event exactly once: key them by (portfolio_id, stream_seq), which
-- is unique too, and drop the index on the random trade_id, the costliest index write of a
-- replay. One index instead of two.
ALTER TABLE trades DROP CONSTRAINT trades_pkey;
DROP INDEX trades_portfolio;
ALTER TABLE trades ADD PRIMARY KEY (portfolio_id, stream_seq);
