-- The stream sequence of each portfolio's last strategy attach or detach: the exit-trigger
-- worker, evaluating a price late (down, or behind the stream), does not judge a portfolio
-- whose strategies were attached or detached after that price (its read model holds the
-- attachments as they are now, not as they were at the price), as it does not judge a
-- position filled, or by a strategy updated, after it. Rows from before this migration take
-- the portfolio's last event, which is no earlier than its last attach or detach: a price
-- before that, evaluated late, is left to the next one. The default keeps a projector of an
-- older release, which does not write the column, working (its attachments are not told
-- apart, as before).
ALTER TABLE portfolios ADD COLUMN strategies_seq bigint NOT NULL DEFAULT 0;
UPDATE portfolios SET strategies_seq = last_seq;
