-- The policy generation a message was decided in: it is checked again at send time only if
-- an opt-out, number change or suspect number was recorded since (or it is a retry).
ALTER TABLE messages ADD COLUMN policy_gen INTEGER NOT NULL DEFAULT 0;
