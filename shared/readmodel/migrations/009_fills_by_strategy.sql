-- The leaderboard ranks a user's strategies by the fills and closed round trips of each: it
-- summed every trade and round trip of every user (its time grew with the whole history, not
-- with the user's strategies). Indexes by strategy let it read the user's strategies' rows
-- alone. (Indexes, not a table of running sums the projector keeps: Postgres keeps them
-- whatever writes the rows, an older projector during a rolling upgrade included.)
CREATE INDEX trades_strategy ON trades (strategy_id);
CREATE INDEX round_trips_closed_strategy ON round_trips (strategy_id) WHERE closed_at IS NOT NULL;
