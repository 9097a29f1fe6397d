-- 0002_schema_version_grant: workers and pollers read the schema version before they start.
--
-- What it does: grants SELECT on outbox.schema_version to the `outbox_worker` role (when the
-- role exists; see the least-privilege block of 0001).
--
-- Locks: one transaction; GRANT touches only the catalog entry of the small version table.

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_worker') THEN
        GRANT SELECT ON outbox.schema_version TO outbox_worker;
    END IF;
END
$$;
