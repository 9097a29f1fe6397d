-- 0005_bounded_lookups: the metrics gauges and the connector_health view stay cheap on a big
-- table: cancelled messages get a partial index (every other status has one, so the gauges
-- count through indexes, never scanning outbox.message); attempts get an index per connector
-- by time (the last hour's counts, the last success) and a partial one holding only failures
-- (the last error, found without reading back through every success).
-- outbox:no-transaction
--
-- Locks: none that block: each index is built with CREATE INDEX CONCURRENTLY (SHARE UPDATE
-- EXCLUSIVE; inserts, updates and deletes go on), outside a transaction, one statement at a
-- time. A build that fails leaves an INVALID index: drop it (DROP INDEX CONCURRENTLY) and run
-- `outbox db migrate` again.

CREATE INDEX CONCURRENTLY IF NOT EXISTS message_cancelled_idx
    ON outbox.message (id) WHERE status = 'cancelled';
CREATE INDEX CONCURRENTLY IF NOT EXISTS attempt_connector_finished_idx
    ON outbox.attempt (connector_id, finished_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS attempt_connector_error_idx
    ON outbox.attempt (connector_id, finished_at) WHERE outcome NOT IN ('sent', 'held');
