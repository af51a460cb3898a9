-- The exit-trigger worker reads the open positions of a symbol for each of its prices: it
-- scanned every position of every symbol. (On the symbol alone, which a position row never
-- changes: its updates on every fill stay heap-only, as they were.)
CREATE INDEX positions_symbol ON positions (symbol);
