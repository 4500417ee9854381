-- Webhook claims read only never-leased rows (webhooks_waiting); leases that ended are found
-- through this index instead of by scanning every due row, leased or not.
CREATE INDEX webhooks_leased ON webhooks (locked_until) WHERE locked_until IS NOT NULL;
