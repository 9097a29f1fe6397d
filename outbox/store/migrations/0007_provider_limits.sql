-- 0007_provider_limits: per-connector provider limits (issue 18): rate limits as canonical
-- 'N/unit' strings (unit s, min, h or day; every one applies across all workers), the most
-- envelope recipients per SMTP transaction and the most messages per SMTP session (NULL: no
-- limit). `--max-connections` is the existing max_connections column.
--
-- Locks: one transaction; ADD COLUMN with a constant default is a catalog change (no rewrite);
-- the three CHECK constraints scan outbox.connector (a handful of rows) under its ACCESS
-- EXCLUSIVE lock; outbox.message is not touched.

ALTER TABLE outbox.connector ADD COLUMN IF NOT EXISTS rate_limits text[] NOT NULL DEFAULT '{}';
ALTER TABLE outbox.connector ADD COLUMN IF NOT EXISTS max_recipients integer;
ALTER TABLE outbox.connector ADD COLUMN IF NOT EXISTS max_messages_per_connection integer;
DO $$
BEGIN
    BEGIN
        ALTER TABLE outbox.connector ADD CONSTRAINT connector_rate_limits_valid CHECK (
            array_position(rate_limits, NULL) IS NULL
            AND array_to_string(rate_limits, ',') ~ '^([1-9][0-9]{0,8}/(s|min|h|day)(,|$))*$');
    EXCEPTION WHEN duplicate_object THEN NULL;
    END;
    BEGIN
        ALTER TABLE outbox.connector ADD CONSTRAINT connector_max_recipients_positive
            CHECK (max_recipients IS NULL OR max_recipients >= 1);
    EXCEPTION WHEN duplicate_object THEN NULL;
    END;
    BEGIN
        ALTER TABLE outbox.connector ADD CONSTRAINT connector_max_messages_per_connection_positive
            CHECK (max_messages_per_connection IS NULL OR max_messages_per_connection >= 1);
    EXCEPTION WHEN duplicate_object THEN NULL;
    END;
END
$$;
