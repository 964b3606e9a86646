-- A conversation's membership version: every member added or removed moves it by one, in the
-- transaction of the change. A send reads it back with its seq, so a node whose cached members
-- are older than the commit (a removal made on another node, its bus event still on the way)
-- finds out before it delivers the message to its own connections.
ALTER TABLE conversations ADD COLUMN members_version BIGINT NOT NULL DEFAULT 0;
