-- A status event keeps the carrier's error code, as on SQLite: both stores hold the same history.
ALTER TABLE events ADD COLUMN error_code TEXT;
