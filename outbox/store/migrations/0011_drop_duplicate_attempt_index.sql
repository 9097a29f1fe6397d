-- 0011_drop_duplicate_attempt_index: outbox.attempt had the same index twice, on (connector_id,
-- finished_at): attempt_connector_idx from the first schema and attempt_connector_finished_idx
-- from 0005. Every attempt row paid for both; the second one stays.
-- outbox:no-transaction
--
-- Locks: DROP INDEX CONCURRENTLY takes no lock that blocks reads or writes of outbox.attempt;
-- it runs outside a transaction. One interrupted midway leaves the index INVALID: run `outbox
-- db migrate` again (IF EXISTS drops what is left).

DROP INDEX CONCURRENTLY IF EXISTS outbox.attempt_connector_idx;
