-- The event stream the read models of this schema are folded from: one row, written by the
-- first projector (or `chctl setup`, or `chctl rebuild`) to use the schema, and checked by every
-- worker and chctl after it. Two subject prefixes on one schema would mix their read models,
-- and setting up or rebuilding one would reset the other's (a prefix set with CH_DB_SCHEMA
-- forgotten works on `public`).
CREATE TABLE ch_stream (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    stream text NOT NULL
);
