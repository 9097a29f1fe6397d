-- 0009_implied_history: a successful delivery writes its outcome on the message row only (issue
-- 17): the attempt that sent a message, and the result of its one recipient, are read from the
-- row (views outbox.attempt_history and outbox.recipient_history) instead of being written as
-- rows of their own; outbox.message leaves room on each page for the new versions of its rows.
--
-- Locks: one transaction. CREATE OR REPLACE VIEW takes ACCESS EXCLUSIVE on the views only
-- (connector_health is replaced with the same columns). ALTER TABLE ... SET (fillfactor) takes
-- SHARE UPDATE EXCLUSIVE on outbox.message (reads and writes go on; nothing is rewritten: pages
-- written from now on keep the room).

ALTER TABLE outbox.message SET (fillfactor = 80);

-- Every attempt of a message: the rows of outbox.attempt, and the attempt that sent a `sent`
-- message, read from the message row (the completer writes no attempt row for it). `id` is
-- NULL for that one (it is the message's last). A database from before this migration has
-- that attempt as a row too, recognised by its finished_at (the row's sent_at): not twice.
CREATE OR REPLACE VIEW outbox.attempt_history AS
SELECT a.id, a.message_id, a.attempt, a.connector_id, a.connector_name, a.started_at,
       a.finished_at, a.phase, a.outcome, a.smtp_code, a.smtp_reply, a.error
  FROM outbox.attempt a
UNION ALL
SELECT NULL::bigint, m.id, m.attempts, m.connector_id, c.name, m.last_attempt_at,
       m.sent_at, m.phase, 'sent'::text, m.last_smtp_code, m.last_smtp_reply, m.last_error
  FROM outbox.message m
  LEFT JOIN outbox.connector c ON c.id = m.connector_id
 WHERE m.status = 'sent'
   AND NOT EXISTS (SELECT FROM outbox.attempt a
                    WHERE a.message_id = m.id AND a.outcome = 'sent' AND a.finished_at = m.sent_at);

-- Per-recipient results: the rows of outbox.recipient, and for a `sent` message that has none
-- (its one envelope recipient was its one address, and accepted it when no earlier attempt had
-- left a result) that recipient, accepted with the message's final reply.
CREATE OR REPLACE VIEW outbox.recipient_history AS
SELECT r.message_id, r.addr, r.status, r.smtp_code, r.smtp_reply, r.updated_at
  FROM outbox.recipient r
UNION ALL
SELECT m.id, x.addr, 'sent'::text, m.last_smtp_code, m.last_smtp_reply, m.sent_at
  FROM outbox.message m
 CROSS JOIN LATERAL unnest(m.to_addrs || m.cc_addrs || m.bcc_addrs) AS x(addr)
 WHERE m.status = 'sent'
   AND NOT EXISTS (SELECT FROM outbox.recipient r WHERE r.message_id = m.id);

-- connector_health counts the deliveries of the last hour, and finds the last success, on the
-- message rows too (through message_finished_idx: a row's sent_at is never after its
-- updated_at). Same columns as before.
CREATE OR REPLACE VIEW outbox.connector_health AS
SELECT c.id AS connector_id,
       c.name AS connector,
       c.direction,
       c.enabled,
       c.is_default_gateway,
       c.host,
       c.port,
       coalesce(h.sent, 0) + coalesce(hs.sent, 0) AS sent_last_hour,
       coalesce(h.failed, 0) AS failed_last_hour,
       greatest(ls.finished_at, ms.sent_at) AS last_success_at,
       le.finished_at AS last_error_at,
       le.error AS last_error,
       (SELECT count(*) FROM outbox.message m
         WHERE m.connector_id = c.id AND m.status = 'held') AS held,
       (SELECT count(*) FROM outbox.message m
         WHERE m.connector_id = c.id AND m.status = 'retry') AS pending_retry,
       -- the worker's own view of the connector: failures before MAIL (connect, TLS, AUTH)
       -- back it off without spending the messages' attempts
       c.failures AS consecutive_failures,
       c.backoff_until,
       c.last_error AS connector_error,
       c.last_error_at AS connector_error_at
  FROM outbox.connector c
  LEFT JOIN LATERAL (
      SELECT count(*) FILTER (WHERE a.outcome = 'sent') AS sent,
             count(*) FILTER (WHERE a.outcome NOT IN ('sent', 'held')) AS failed
        FROM outbox.attempt a
       WHERE a.connector_id = c.id AND a.finished_at > now() - interval '1 hour') h ON true
  LEFT JOIN LATERAL (
      SELECT count(*) AS sent
        FROM outbox.message m
       WHERE m.status = 'sent' AND m.connector_id = c.id
         AND m.updated_at > now() - interval '1 hour' AND m.sent_at > now() - interval '1 hour'
         AND NOT EXISTS (SELECT FROM outbox.attempt a WHERE a.message_id = m.id
                            AND a.outcome = 'sent' AND a.finished_at = m.sent_at)) hs ON true
  LEFT JOIN LATERAL (
      SELECT a.finished_at FROM outbox.attempt a
       WHERE a.connector_id = c.id AND a.outcome IN ('sent', 'partial')
       ORDER BY a.finished_at DESC LIMIT 1) ls ON true
  LEFT JOIN LATERAL (
      SELECT m.sent_at FROM outbox.message m
       WHERE m.status = 'sent' AND m.connector_id = c.id
       ORDER BY m.updated_at DESC LIMIT 1) ms ON true
  LEFT JOIN LATERAL (
      SELECT a.finished_at,
             coalesce(a.error, concat_ws(' ', a.smtp_code::text, a.smtp_reply)) AS error
        FROM outbox.attempt a
       WHERE a.connector_id = c.id AND a.outcome NOT IN ('sent', 'held')
       ORDER BY a.finished_at DESC LIMIT 1) le ON true
 WHERE c.direction IN ('outgoing', 'both');
