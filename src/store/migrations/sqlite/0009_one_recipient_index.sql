-- Messages by recipient through one index instead of two. Recipients are random keys, so each
-- entry lands on a page of its own: every message paid three such page writes (an entry in
-- both indexes at submission, and its removal from the partial one when claimed). The one
-- index leads with the recipient, so the lookups of a number across accounts (number changes,
-- suspects) and within one (opt-outs, a subject's export and erasure) both use it; the first
-- ones now also read the number's ended messages, which retention bounds, to filter on status.
DROP INDEX messages_waiting_recipient;
DROP INDEX messages_account_recipient;
CREATE INDEX messages_recipient ON messages (recipient, account, id);
