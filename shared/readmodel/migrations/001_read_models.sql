-- Read models of CipherHorizon. Disposable: every row can be rebuilt from the stream.
-- Unqualified names: the connection's search_path selects the schema (CH_DB_SCHEMA).

-- Last stream sequence applied by each projection; moved in the same transaction as the change.
CREATE TABLE ch_checkpoints (
    projection text PRIMARY KEY,
    last_seq   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- proj-portfolio -------------------------------------------------------------------------

CREATE TABLE portfolios (
    portfolio_id     text PRIMARY KEY,
    user_id          text NOT NULL,
    name             text NOT NULL,
    quote_currency   text NOT NULL,
    fee_rate         numeric NOT NULL,
    status           text NOT NULL,
    cash             numeric NOT NULL DEFAULT 0,
    net_deposits     numeric NOT NULL DEFAULT 0,
    realized_pnl     numeric NOT NULL DEFAULT 0,
    fees_paid        numeric NOT NULL DEFAULT 0,
    fill_count       bigint NOT NULL DEFAULT 0,
    rejected_signals bigint NOT NULL DEFAULT 0,
    -- Time-weighted return chain: NAV index at the last external flow, and the equity just
    -- after that flow (DOMAIN.md, "Returns").
    nav_at_flow      numeric NOT NULL DEFAULT 1,
    equity_at_flow   numeric NOT NULL DEFAULT 0,
    first_deposit_at timestamptz,
    version          bigint NOT NULL,
    opened_at        timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    last_seq         bigint NOT NULL
);
CREATE INDEX portfolios_user ON portfolios (user_id);

CREATE TABLE positions (
    portfolio_id text NOT NULL REFERENCES portfolios ON DELETE CASCADE,
    symbol       text NOT NULL,
    quantity     numeric NOT NULL,
    cost_basis   numeric NOT NULL,
    gross_entry  numeric NOT NULL,
    PRIMARY KEY (portfolio_id, symbol)
);

-- Latest mark per symbol (by business time).
CREATE TABLE marks (
    symbol   text PRIMARY KEY,
    price    numeric NOT NULL,
    at       timestamptz NOT NULL,
    last_seq bigint NOT NULL
);

CREATE TABLE trades (
    trade_id       uuid PRIMARY KEY,
    portfolio_id   text NOT NULL,
    strategy_id    text NOT NULL,
    symbol         text NOT NULL,
    side           text NOT NULL,
    quantity       numeric NOT NULL,
    price          numeric NOT NULL,
    fee            numeric NOT NULL,
    realized_pnl   numeric NOT NULL,
    cash_after     numeric NOT NULL,
    position_after numeric NOT NULL,
    at             timestamptz NOT NULL,
    stream_seq     bigint NOT NULL
);
CREATE INDEX trades_portfolio ON trades (portfolio_id, stream_seq);

-- Round trips: flat to flat per symbol. `pnl` sums the realized PnL of the trip's sells.
CREATE TABLE round_trips (
    portfolio_id text NOT NULL,
    symbol       text NOT NULL,
    opened_seq   bigint NOT NULL,
    opened_at    timestamptz NOT NULL,
    closed_at    timestamptz,
    pnl          numeric NOT NULL DEFAULT 0,
    fees         numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (portfolio_id, symbol, opened_seq)
);
CREATE INDEX round_trips_open ON round_trips (portfolio_id, symbol) WHERE closed_at IS NULL;

CREATE TABLE portfolio_strategies (
    portfolio_id text NOT NULL,
    strategy_id  text NOT NULL,
    attached_at  timestamptz NOT NULL,
    PRIMARY KEY (portfolio_id, strategy_id)
);
CREATE INDEX portfolio_strategies_strategy ON portfolio_strategies (strategy_id);

-- proj-strategy --------------------------------------------------------------------------

CREATE TABLE strategies (
    strategy_id  text PRIMARY KEY,
    user_id      text NOT NULL,
    name         text NOT NULL,
    status       text NOT NULL,
    rules        jsonb NOT NULL,
    risk_profile jsonb NOT NULL,
    version      bigint NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    last_seq     bigint NOT NULL
);
CREATE INDEX strategies_user ON strategies (user_id, strategy_id);
