-- As SQLite's 0005: the id exactly as the carrier's submit_sm_resp wrote it (query_sm must
-- name it so; the matching key `carrier_message_id` is normalised), and when the part was last
-- asked about.
ALTER TABLE parts ADD COLUMN submitted_id TEXT;
ALTER TABLE parts ADD COLUMN queried_at BIGINT;
