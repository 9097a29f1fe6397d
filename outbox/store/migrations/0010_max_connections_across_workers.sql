-- 0010_max_connections_across_workers: `--max-connections N` becomes what DESIGN.md says, the
-- most concurrent SMTP sessions to a connector across all worker processes and hosts (held by
-- the workers through Redis), and `none` clears it: max_connections may be NULL and is NULL
-- by default. Each worker process still keeps up to 4 sessions of its own to a connector
-- without a cap (as before); connectors at the old default 4 become NULL, so they behave
-- exactly as before; any other value (set by an operator) becomes a cap across workers.
--
-- Also the workers' adaptive slow-down after throttling replies: throttle_interval_seconds
-- (the spacing between sends the connector was slowed to) and throttled_at (when; the spacing
-- halves every 30 s after it), written by the workers, read by every worker and `connector
-- list`.
--
-- Locks: one transaction; DROP NOT NULL, SET DEFAULT and ADD COLUMN without a default are
-- catalog changes; the UPDATE
-- touches outbox.connector (a handful of rows) under its ROW EXCLUSIVE lock; outbox.message
-- is not touched.

ALTER TABLE outbox.connector ALTER COLUMN max_connections DROP NOT NULL;
ALTER TABLE outbox.connector ALTER COLUMN max_connections SET DEFAULT NULL;
UPDATE outbox.connector SET max_connections = NULL WHERE max_connections = 4;
ALTER TABLE outbox.connector ADD COLUMN IF NOT EXISTS throttle_interval_seconds double precision;
ALTER TABLE outbox.connector ADD COLUMN IF NOT EXISTS throttled_at timestamptz;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_worker') THEN
        GRANT UPDATE (throttle_interval_seconds, throttled_at) ON outbox.connector TO outbox_worker;
    END IF;
END
$$;
