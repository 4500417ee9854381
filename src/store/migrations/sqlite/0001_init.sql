-- Times are Unix milliseconds (INTEGER). Ids are UUIDv7 text, so they sort by creation time.

CREATE TABLE messages (
    id            TEXT PRIMARY KEY NOT NULL,
    account       TEXT NOT NULL,
    reference     TEXT,
    recipient     TEXT NOT NULL,          -- E.164
    sender        TEXT NOT NULL,
    body          TEXT,                   -- NULL once purged
    category      TEXT NOT NULL,
    encoding      TEXT NOT NULL,
    segments      INTEGER NOT NULL,
    priority      INTEGER NOT NULL DEFAULT 0,
    webhook_url   TEXT,                   -- resolved at submit: callback_url or the account's
    consent_at    INTEGER,
    status        TEXT NOT NULL,
    detail        TEXT,                   -- why the latest status, e.g. an SMPP error
    error_code    TEXT,
    carrier       TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    due_at        INTEGER NOT NULL,       -- next attempt: send_at, or a retry
    expires_at    INTEGER NOT NULL,
    locked_until  INTEGER                 -- lease while status = 'sending'
) STRICT;

-- The dispatcher's claim: only waiting messages are indexed, so the index stays small however
-- large the history grows.
CREATE INDEX messages_due ON messages (priority DESC, due_at)
    WHERE status IN ('queued', 'scheduled');
CREATE INDEX messages_sending ON messages (locked_until) WHERE status = 'sending';
CREATE INDEX messages_expiry ON messages (expires_at) WHERE status IN ('queued', 'scheduled');
CREATE INDEX messages_account ON messages (account, id);
CREATE INDEX messages_account_recipient ON messages (account, recipient, id);

CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL,
    at          INTEGER NOT NULL,
    status      TEXT NOT NULL,
    detail      TEXT
) STRICT;
CREATE INDEX events_message ON events (message_id, id);

-- One row per segment accepted by a carrier: receipts name segments, not messages.
CREATE TABLE parts (
    message_id         TEXT NOT NULL,
    part               INTEGER NOT NULL,
    carrier            TEXT NOT NULL,
    carrier_message_id TEXT NOT NULL,    -- normalised (receipt::normalize_id)
    state              TEXT NOT NULL,    -- 'submitted' or a receipt state
    updated_at         INTEGER NOT NULL,
    PRIMARY KEY (message_id, part)
) STRICT;
CREATE INDEX parts_carrier_id ON parts (carrier, carrier_message_id);

-- Receipts that arrived before their submit_sm_resp was stored (DOMAIN.md §3.5.3), or for ids
-- never seen. Applied when the matching part is recorded; purged after a while.
CREATE TABLE early_receipts (
    carrier            TEXT NOT NULL,
    carrier_message_id TEXT NOT NULL,
    state              TEXT NOT NULL,
    error_code         TEXT,
    received_at        INTEGER NOT NULL
) STRICT;
CREATE INDEX early_receipts_id ON early_receipts (carrier, carrier_message_id);
CREATE INDEX early_receipts_age ON early_receipts (received_at);

CREATE TABLE inbound (
    id          TEXT PRIMARY KEY NOT NULL,
    account     TEXT,
    carrier     TEXT NOT NULL,
    sender      TEXT NOT NULL,          -- the handset, E.164 where it parses
    recipient   TEXT NOT NULL,          -- our sender id / number
    body        TEXT,
    received_at INTEGER NOT NULL
) STRICT;

-- Durable webhook outbox: written in the same transaction as the change it reports.
CREATE TABLE webhooks (
    id            INTEGER PRIMARY KEY,
    account       TEXT NOT NULL,
    url           TEXT NOT NULL,
    payload       TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    due_at        INTEGER NOT NULL,
    locked_until  INTEGER,
    last_error    TEXT
) STRICT;
CREATE INDEX webhooks_due ON webhooks (due_at);
CREATE INDEX webhooks_waiting ON webhooks (due_at) WHERE locked_until IS NULL;

CREATE TABLE idempotency (
    account       TEXT NOT NULL,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    status_code   INTEGER NOT NULL,
    answer        TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (account, key)
) STRICT;
