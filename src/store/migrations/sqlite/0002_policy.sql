-- Opt-outs: keyed by the HMAC pseudonym of the number, so that a suppression survives the
-- erasure of the subject (the plain number is then NULL).
CREATE TABLE opt_outs (
    account     TEXT NOT NULL,
    number_key  TEXT NOT NULL,
    number      TEXT,                 -- E.164; NULL once the subject is erased
    sender      TEXT NOT NULL,        -- '' = every sender of the account
    source      TEXT NOT NULL,        -- inbound, api, cli, import
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (account, number_key, sender)
) STRICT;

-- Every opt-out and opt-in, with its source and actor.
CREATE TABLE opt_out_journal (
    id          INTEGER PRIMARY KEY,
    account     TEXT NOT NULL,
    number_key  TEXT NOT NULL,
    number      TEXT,
    sender      TEXT NOT NULL,
    action      TEXT NOT NULL,        -- opt_out, opt_in
    source      TEXT NOT NULL,
    actor       TEXT,
    at          INTEGER NOT NULL
) STRICT;
CREATE INDEX opt_out_journal_key ON opt_out_journal (account, number_key, id);

-- Number changes: deactivated, or changed to another number, from an effective time.
CREATE TABLE number_changes (
    id            INTEGER PRIMARY KEY,
    account       TEXT,               -- NULL: applies to every account (imports, operator)
    number        TEXT NOT NULL,
    kind          TEXT NOT NULL,      -- deactivated, changed
    new_number    TEXT,
    effective_at  INTEGER NOT NULL,
    source        TEXT NOT NULL,
    created_at    INTEGER NOT NULL
) STRICT;
CREATE INDEX number_changes_number ON number_changes (number, effective_at);

-- Carrier feedback: permanent "unknown subscriber" results per number.
CREATE TABLE suspects (
    number      TEXT PRIMARY KEY NOT NULL,
    failures    INTEGER NOT NULL,
    suspect     INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE INDEX messages_waiting_recipient ON messages (recipient)
    WHERE status IN ('queued', 'scheduled', 'held_suspect');
