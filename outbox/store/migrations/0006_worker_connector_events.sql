-- 0006_worker_connector_events: workers record each backoff of a connector (token endpoint,
-- connect, TLS, AUTH failures; once per backoff window, with the reason) in its activity
-- history, `outbox.connector_event` (action "backing off", actor "worker"); `outbox_worker`
-- may insert there.
--
-- Locks: one transaction; GRANT updates outbox.connector_event's privilege entry in the
-- catalog; the table is neither scanned nor rewritten.

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_worker') THEN
        GRANT INSERT ON outbox.connector_event TO outbox_worker;
    END IF;
END
$$;
