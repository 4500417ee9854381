-- Webhooks handed to this process's sender in memory have no outbox row: the status event
-- they report is their durable copy (hook = 1). Every such event up to `settled_through` has
-- been posted or written to the outbox; the ones after it are posted again after a crash.
-- Event ids are given by the writer in increasing order, never reused, so the cursor holds.
ALTER TABLE events ADD COLUMN error_code TEXT;
ALTER TABLE events ADD COLUMN hook INTEGER;
CREATE TABLE webhook_journal (
    only             INTEGER PRIMARY KEY CHECK (only = 1),
    settled_through  INTEGER NOT NULL
) STRICT;
INSERT INTO webhook_journal (only, settled_through)
    VALUES (1, COALESCE((SELECT MAX(id) FROM events), 0));
-- Unused: claims read webhooks_waiting, ended leases webhooks_leased.
DROP INDEX webhooks_due;
