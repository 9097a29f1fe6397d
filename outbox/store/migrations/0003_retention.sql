-- 0003_retention: automatic retention (settings retention_days, audit_retention_days) and the
-- two batch-delete functions the poller and `outbox prune` share.
--
-- Locks: one transaction. ACCESS EXCLUSIVE on outbox.settings (one row) for two ADD COLUMNs
-- with constant defaults (catalog only, no rewrite) and a CHECK that reads that one row;
-- SHARE on outbox.connector_event while its `at` index is built (a small activity table:
-- connector changes only; its writers wait for the build). outbox.message is not locked.

-- Automatic retention: finished messages (with their attempts, recipient results and
-- attachments) older than `retention-days`, and connector_event / operator_audit rows older
-- than `audit-retention-days`, are deleted by the poller in small batches. 0 keeps forever.
ALTER TABLE outbox.settings ADD COLUMN IF NOT EXISTS retention_days integer NOT NULL DEFAULT 0;
ALTER TABLE outbox.settings ADD COLUMN IF NOT EXISTS audit_retention_days integer NOT NULL DEFAULT 0;
DO $$
BEGIN
    ALTER TABLE outbox.settings ADD CONSTRAINT settings_retention_days_not_negative
        CHECK (retention_days >= 0 AND audit_retention_days >= 0);
EXCEPTION WHEN duplicate_object THEN NULL;
END
$$;
CREATE INDEX IF NOT EXISTS connector_event_at_idx ON outbox.connector_event (at);

-- One batch of finished messages last changed before `cutoff`, with their history: the oldest
-- first, rows locked by someone else left for the next batch. Used by `outbox prune` and by
-- the poller's retention. SECURITY DEFINER: the poller's role (`outbox_worker`) may delete
-- finished messages this way and no other.
CREATE OR REPLACE FUNCTION outbox.delete_finished(cutoff timestamptz, batch integer)
RETURNS TABLE (messages bigint, attempts bigint, recipients bigint, attachments bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
WITH doomed AS MATERIALIZED (
    SELECT id FROM outbox.message
     WHERE status IN ('sent', 'partial', 'failed', 'cancelled') AND updated_at < cutoff
     ORDER BY updated_at
     LIMIT batch
       FOR UPDATE SKIP LOCKED),
a AS (DELETE FROM outbox.attempt a USING doomed d WHERE a.message_id = d.id RETURNING 1),
r AS (DELETE FROM outbox.recipient r USING doomed d WHERE r.message_id = d.id RETURNING 1),
x AS (DELETE FROM outbox.attachment x USING doomed d WHERE x.message_id = d.id RETURNING 1),
m AS (DELETE FROM outbox.message m USING doomed d WHERE m.id = d.id RETURNING 1)
SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM a), (SELECT count(*) FROM r),
       (SELECT count(*) FROM x)
$$;

-- One batch of connector activity and operator audit rows older than `cutoff`.
CREATE OR REPLACE FUNCTION outbox.delete_old_history(cutoff timestamptz, batch integer)
RETURNS TABLE (connector_events bigint, audits bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
WITH e AS (
    DELETE FROM outbox.connector_event WHERE id IN (
        SELECT id FROM outbox.connector_event WHERE at < cutoff ORDER BY at LIMIT batch)
    RETURNING 1),
o AS (
    DELETE FROM outbox.operator_audit WHERE id IN (
        SELECT id FROM outbox.operator_audit WHERE at < cutoff ORDER BY at LIMIT batch)
    RETURNING 1)
SELECT (SELECT count(*) FROM e), (SELECT count(*) FROM o)
$$;
REVOKE ALL ON FUNCTION outbox.delete_finished(timestamptz, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.delete_old_history(timestamptz, integer) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_worker') THEN
        GRANT EXECUTE ON FUNCTION outbox.delete_finished(timestamptz, integer),
                                  outbox.delete_old_history(timestamptz, integer)
            TO outbox_worker;
    END IF;
END
$$;
