-- SQLite evaluates `x IN (a, b, c)` over three or more constants through a temporary b-tree
-- that it builds each time the statement runs, and two constants by direct comparison. The
-- partial index below had such a list in its WHERE, which every INSERT of a message and every
-- change of its status evaluates (an UPDATE twice: the old row and the new), so each built up
-- to two temporary b-trees. Queries that use the index repeat its WHERE word for word.
DROP INDEX messages_waiting_recipient;
CREATE INDEX messages_waiting_recipient ON messages (recipient)
    WHERE status IN ('queued', 'scheduled') OR status = 'held_suspect';
