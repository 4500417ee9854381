-- The PostgreSQL schema: the same tables as SQLite's migrations 0001-0004, for several smsgw
-- instances sharing one database. Times are Unix milliseconds (BIGINT). Ids are UUIDv7 text,
-- which sort by creation time: key columns use the "C" collation so that they sort bytewise,
-- as in SQLite, whatever the database's locale.

CREATE TABLE messages (
    id               TEXT COLLATE "C" PRIMARY KEY,
    account          TEXT COLLATE "C" NOT NULL,
    reference        TEXT,
    recipient        TEXT COLLATE "C" NOT NULL,  -- E.164
    sender           TEXT COLLATE "C" NOT NULL,
    body             TEXT,                       -- NULL once purged
    category         TEXT NOT NULL,
    encoding         TEXT NOT NULL,
    segments         BIGINT NOT NULL,
    priority         BIGINT NOT NULL DEFAULT 0,
    webhook_url      TEXT,
    consent_at       BIGINT,
    status           TEXT NOT NULL,
    detail           TEXT,
    error_code       TEXT,
    carrier          TEXT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    due_at           BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    locked_until     BIGINT,                     -- lease while status = 'sending'
    claimed_by       TEXT,                       -- the instance holding the lease
    service_messages BOOLEAN NOT NULL DEFAULT FALSE,
    policy_gen       BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX messages_due ON messages (priority DESC, due_at)
    WHERE status IN ('queued', 'scheduled');
CREATE INDEX messages_sending ON messages (locked_until) WHERE status = 'sending';
CREATE INDEX messages_claimed ON messages (claimed_by) WHERE status = 'sending';
CREATE INDEX messages_expiry ON messages (expires_at) WHERE status IN ('queued', 'scheduled');
CREATE INDEX messages_account ON messages (account, id);
CREATE INDEX messages_account_recipient ON messages (account, recipient, id);
CREATE INDEX messages_waiting_recipient ON messages (recipient)
    WHERE status IN ('queued', 'scheduled', 'held_suspect');
CREATE INDEX messages_with_body ON messages (id) WHERE body IS NOT NULL;
CREATE INDEX messages_canceled ON messages (id) WHERE status = 'canceled';
CREATE INDEX messages_held ON messages (recipient) WHERE status = 'held_suspect';

CREATE TABLE events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  TEXT COLLATE "C" NOT NULL,
    at          BIGINT NOT NULL,
    status      TEXT NOT NULL,
    detail      TEXT
);
CREATE INDEX events_message ON events (message_id, id);

CREATE TABLE parts (
    message_id         TEXT COLLATE "C" NOT NULL,
    part               BIGINT NOT NULL,
    carrier            TEXT COLLATE "C" NOT NULL,
    carrier_message_id TEXT COLLATE "C" NOT NULL,
    state              TEXT NOT NULL,
    updated_at         BIGINT NOT NULL,
    PRIMARY KEY (message_id, part)
);
CREATE INDEX parts_carrier_id ON parts (carrier, carrier_message_id);

-- Receipts that arrived (at any instance) before their submit_sm_resp was stored.
CREATE TABLE early_receipts (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    carrier            TEXT COLLATE "C" NOT NULL,
    carrier_message_id TEXT COLLATE "C" NOT NULL,
    state              TEXT NOT NULL,
    error_code         TEXT,
    received_at        BIGINT NOT NULL
);
CREATE INDEX early_receipts_id ON early_receipts (carrier, carrier_message_id);
CREATE INDEX early_receipts_age ON early_receipts (received_at);

CREATE TABLE inbound (
    id          TEXT COLLATE "C" PRIMARY KEY,
    account     TEXT COLLATE "C",
    carrier     TEXT NOT NULL,
    sender      TEXT COLLATE "C" NOT NULL,
    recipient   TEXT NOT NULL,
    body        TEXT,
    received_at BIGINT NOT NULL
);
CREATE INDEX inbound_with_body ON inbound (id) WHERE body IS NOT NULL;
CREATE INDEX inbound_sender ON inbound (account, sender);

CREATE TABLE webhooks (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account       TEXT COLLATE "C" NOT NULL,
    url           TEXT NOT NULL,
    payload       TEXT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    due_at        BIGINT NOT NULL,
    locked_until  BIGINT,
    last_error    TEXT
);
CREATE INDEX webhooks_due ON webhooks (due_at);
CREATE INDEX webhooks_waiting ON webhooks (due_at) WHERE locked_until IS NULL;
CREATE INDEX webhooks_age ON webhooks (created_at);

CREATE TABLE idempotency (
    account       TEXT COLLATE "C" NOT NULL,
    key           TEXT COLLATE "C" NOT NULL,
    request_hash  TEXT NOT NULL,
    status_code   BIGINT NOT NULL,
    answer        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX idempotency_age ON idempotency (created_at);

CREATE TABLE opt_outs (
    account     TEXT COLLATE "C" NOT NULL,
    number_key  TEXT COLLATE "C" NOT NULL,
    number      TEXT,
    sender      TEXT COLLATE "C" NOT NULL,      -- '' = every sender of the account
    source      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (account, number_key, sender)
);

CREATE TABLE opt_out_journal (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account     TEXT COLLATE "C" NOT NULL,
    number_key  TEXT COLLATE "C" NOT NULL,
    number      TEXT,
    sender      TEXT NOT NULL,
    action      TEXT NOT NULL,
    source      TEXT NOT NULL,
    actor       TEXT,
    at          BIGINT NOT NULL
);
CREATE INDEX opt_out_journal_key ON opt_out_journal (account, number_key, id);

CREATE TABLE number_changes (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account       TEXT COLLATE "C",
    number        TEXT COLLATE "C" NOT NULL,
    kind          TEXT NOT NULL,
    new_number    TEXT,
    effective_at  BIGINT NOT NULL,
    source        TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
CREATE INDEX number_changes_number ON number_changes (number, effective_at);

CREATE TABLE suspects (
    number      TEXT COLLATE "C" PRIMARY KEY,
    failures    BIGINT NOT NULL,
    suspect     BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at  BIGINT NOT NULL
);

-- The policy generation, shared by every instance: it counts changes of the policy's facts
-- (opt-outs, number changes, suspects), so that a message is checked again at send time only
-- when something changed since it was decided. `next_effective`: the earliest future effective
-- time of a number change, when the facts change by themselves.
CREATE TABLE policy_clock (
    one            BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    generation     BIGINT NOT NULL,
    next_effective BIGINT NOT NULL
);
INSERT INTO policy_clock (generation, next_effective) VALUES (1, 9223372036854775807);
