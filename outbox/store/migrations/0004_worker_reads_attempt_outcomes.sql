-- 0004_worker_reads_attempt_outcomes: the poller's lease reaper (worker/queries.sql
-- `reap_expired`) counts a message's earlier lease-expired attempts to decide whether to give an
-- attempt back; as `outbox_worker` it was refused ("permission denied for table attempt"), so
-- a least-privilege poller failed its maintenance. Grants SELECT on the three columns it reads.
--
-- Locks: one transaction; GRANT updates the privilege entries of outbox.attempt in the catalog
-- (pg_attribute rows); the table is neither scanned nor rewritten.

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_worker') THEN
        GRANT SELECT (message_id, outcome, phase) ON outbox.attempt TO outbox_worker;
    END IF;
END
$$;
