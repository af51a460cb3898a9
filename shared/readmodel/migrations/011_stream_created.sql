-- Which stream a read model was folded from, beyond its name: the stream's creation time, as
-- JetStream reports it. A stream deleted and made again, or another server's (a cluster's)
-- of the same name, has another; a projector that finds a time other than its stream's empties
-- its read model and folds that stream from the start (checkpoints alone cannot tell: the new
-- stream may be longer than the old one's checkpoint). NULL until a projector of this release
-- records it.
ALTER TABLE ch_checkpoints ADD COLUMN stream_created timestamptz;
