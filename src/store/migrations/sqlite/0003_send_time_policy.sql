-- The account's right, at submission, to send service messages to opted-out numbers: the
-- policy is checked again when a message is claimed for sending, and needs it then.
ALTER TABLE messages ADD COLUMN service_messages INTEGER NOT NULL DEFAULT 0;

-- The retention purge and erasure find their rows by index, not by reading the tables.
CREATE INDEX messages_with_body ON messages (id) WHERE body IS NOT NULL;
CREATE INDEX messages_canceled ON messages (id) WHERE status = 'canceled';
CREATE INDEX inbound_with_body ON inbound (id) WHERE body IS NOT NULL;
CREATE INDEX inbound_sender ON inbound (account, sender);
CREATE INDEX idempotency_age ON idempotency (created_at);
CREATE INDEX webhooks_age ON webhooks (created_at);
CREATE INDEX messages_held ON messages (recipient) WHERE status = 'held_suspect';
