-- The projector writes a history row per flow and fill. The analysis reads them by
-- (portfolio_id, at, stream_seq), which is unique too: one index instead of two.
ALTER TABLE portfolio_history DROP CONSTRAINT portfolio_history_pkey;
DROP INDEX portfolio_history_at;
ALTER TABLE portfolio_history ADD PRIMARY KEY (portfolio_id, at, stream_seq);

-- Rows rewritten on every fill: leave room on their pages for the new versions, so that the
-- updates stay heap-only (no new index entries).
ALTER TABLE portfolios SET (fillfactor = 80);
ALTER TABLE positions SET (fillfactor = 80);
ALTER TABLE round_trips SET (fillfactor = 80);
