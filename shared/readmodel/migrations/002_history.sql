-- History for analytics (ch.query.portfolio.analysis) and exit triggers: every price, and each
-- portfolio's cash and positions after every flow and fill. Curves are valued from these at
-- query time with the latest price at or before each time, so late (backfilled) prices and
-- replays give the same answer.

CREATE TABLE prices (
    symbol     text NOT NULL,
    at         timestamptz NOT NULL,
    stream_seq bigint NOT NULL,
    price      numeric NOT NULL,
    PRIMARY KEY (symbol, at, stream_seq)
);

CREATE TABLE portfolio_history (
    portfolio_id text NOT NULL,
    stream_seq   bigint NOT NULL,
    at           timestamptz NOT NULL,
    cash         numeric NOT NULL,
    -- {"BTC-USDT": {"quantity": "0.5", "cost_basis": "10010", "gross_entry": "10000"}, ...}
    positions    jsonb NOT NULL,
    -- External flow of this event: deposit > 0, withdrawal < 0, 0 for a fill.
    flow         numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (portfolio_id, stream_seq)
);
CREATE INDEX portfolio_history_at ON portfolio_history (portfolio_id, at, stream_seq);

-- The strategy whose signal closed a round trip (leaderboards by strategy).
ALTER TABLE round_trips ADD COLUMN strategy_id text;
