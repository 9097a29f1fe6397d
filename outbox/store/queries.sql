-- insert_message --
-- Insert one validated message unless it is over the size limit (system mail is exempt) or
-- its idempotency key exists. Routing never refuses a message (one with no route fails at
-- send time); whether its From has a route right now is returned for `outbox send` to warn.
-- Returns the new id (or NULL), the size limit in force and whether the From has a route.
WITH limits AS (SELECT max_message_bytes FROM outbox.settings),
ins AS (
    INSERT INTO outbox.message (
        from_addr, from_name, to_addrs, cc_addrs, bcc_addrs, reply_to, subject, text_body,
        html_body, headers, importance, priority, system_generated, reference,
        idempotency_key, send_after, message_id, size_bytes, content)
    SELECT %(from_addr)s, %(from_name)s, %(to_addrs)s, %(cc_addrs)s, %(bcc_addrs)s,
           %(reply_to)s, %(subject)s, %(text_body)s, %(html_body)s, %(headers)s,
           %(importance)s, %(priority)s, %(system_generated)s, %(reference)s,
           %(idempotency_key)s, %(send_after)s, %(message_id)s, %(size_bytes)s, %(content)s
      FROM limits
     WHERE %(size_bytes)s <= limits.max_message_bytes OR %(system_generated)s
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id)
SELECT (SELECT id FROM ins) AS id, (SELECT max_message_bytes FROM limits) AS max_message_bytes,
       EXISTS (
           SELECT 1 FROM outbox.connector c
            WHERE c.direction IN ('outgoing', 'both')
              AND ((c.is_default_gateway AND c.enabled)
                   OR c.address = lower(%(from_addr)s) OR lower(%(from_addr)s) = ANY (c.aliases))
       ) AS routable;

-- message_by_idempotency_key --
-- The id of the message already inserted with this key.
SELECT id FROM outbox.message WHERE idempotency_key = %(idempotency_key)s;

-- insert_attachment --
-- One attachment of a message.
INSERT INTO outbox.attachment (message_id, filename, content_type, content)
VALUES (%(message_id)s, %(filename)s, %(content_type)s, %(content)s);

-- unmonitored_address --
-- The From of automated mail.
SELECT unmonitored_address FROM outbox.settings;

-- settings --
-- All instance-wide settings.
SELECT * FROM outbox.settings;

-- connectors --
-- Every connector, by name.
SELECT * FROM outbox.connector ORDER BY name;

-- connector_waiting --
-- Messages given back to wait for their connector's limits (phase 'waiting', not claimed
-- again yet), per connector and what they wait for: how many, and until when as their rows
-- say (the worker writes `waiting for rate limit 30/min until 2026-12-05T19:58:03+00:00`).
SELECT connector_id,
       substring(last_error FROM '^waiting for (.*) until \S+$') AS waiting_for,
       count(*) AS messages,
       max(substring(last_error FROM ' until (\S+)$')::timestamptz) AS until
  FROM outbox.message
 WHERE status IN ('queued', 'retry') AND phase = 'waiting' AND connector_id IS NOT NULL
   AND last_error ~ '^waiting for .* until \S+$'
 GROUP BY 1, 2
 ORDER BY 1, 3 DESC, 2;

-- connector_by_name --
-- One connector.
SELECT * FROM outbox.connector WHERE name = %(name)s;

-- lock_connectors --
-- Serialises connector changes so address checks and the gateway rule hold.
LOCK TABLE outbox.connector IN SHARE ROW EXCLUSIVE MODE;

-- insert_connector --
-- Register a connector.
INSERT INTO outbox.connector (
    name, direction, address, aliases, host, port, security, username, password_env,
    password_enc, ca_file, enabled, is_default_gateway, max_connections, timeout_seconds,
    auth, oauth_client_id, oauth_client_secret_env, oauth_client_secret_enc, oauth_tenant,
    oauth_token_url, oauth_scopes, rate_limits, max_recipients, max_messages_per_connection)
VALUES (%(name)s, %(direction)s, %(address)s, %(aliases)s, %(host)s, %(port)s, %(security)s,
        %(username)s, %(password_env)s, %(password_enc)s, %(ca_file)s, %(enabled)s,
        %(is_default_gateway)s, %(max_connections)s, %(timeout_seconds)s, %(auth)s,
        %(oauth_client_id)s, %(oauth_client_secret_env)s, %(oauth_client_secret_enc)s,
        %(oauth_tenant)s, %(oauth_token_url)s, %(oauth_scopes)s, %(rate_limits)s,
        %(max_recipients)s, %(max_messages_per_connection)s)
RETURNING id;

-- update_connector --
-- Change a connector's settings (not its name, gateway role or enabled flag).
UPDATE outbox.connector
   SET direction = %(direction)s, address = %(address)s, aliases = %(aliases)s, host = %(host)s,
       port = %(port)s, security = %(security)s, username = %(username)s,
       password_env = %(password_env)s, password_enc = %(password_enc)s, ca_file = %(ca_file)s,
       max_connections = %(max_connections)s, timeout_seconds = %(timeout_seconds)s,
       auth = %(auth)s, oauth_client_id = %(oauth_client_id)s,
       oauth_client_secret_env = %(oauth_client_secret_env)s,
       oauth_client_secret_enc = %(oauth_client_secret_enc)s, oauth_tenant = %(oauth_tenant)s,
       oauth_token_url = %(oauth_token_url)s, oauth_scopes = %(oauth_scopes)s,
       rate_limits = %(rate_limits)s, max_recipients = %(max_recipients)s,
       max_messages_per_connection = %(max_messages_per_connection)s,
       updated_at = now()
 WHERE id = %(id)s;

-- set_connector_password --
-- Store a re-encrypted password.
UPDATE outbox.connector SET password_enc = %(password_enc)s, updated_at = now()
 WHERE id = %(id)s;

-- set_connector_client_secret --
-- Store a re-encrypted OAuth client secret.
UPDATE outbox.connector SET oauth_client_secret_enc = %(secret_enc)s, updated_at = now()
 WHERE id = %(id)s;

-- set_connector_enabled --
-- Enable or disable a connector.
UPDATE outbox.connector SET enabled = %(enabled)s, updated_at = now()
 WHERE id = %(id)s;

-- release_held_for_connector --
-- Messages held for a connector go back to the queue when it is enabled.
WITH released AS (
    UPDATE outbox.message
       SET status = CASE WHEN attempts = 0 THEN 'queued' ELSE 'retry' END,
           next_attempt_at = now(), updated_at = now()
     WHERE status = 'held' AND connector_id = %(id)s
    RETURNING id)
SELECT count(*) AS released, pg_notify('outbox_message', '') FROM released;

-- reset_connector_backoff --
-- End a connector's backoff now (an operator fixed it, or said so): failures and
-- backoff_until cleared (last_error and last_error_at stay, as history), updated_at bumped so
-- every worker reloads the connector at once, and the messages waiting for it made due now.
-- Waiting for it: `retry` rows routed through it, due later, whose last attempt stopped before
-- MAIL (OAuth token, connect, greeting, STARTTLS, AUTH): the worker gives exactly those the connector's
-- backoff as their next attempt (a retry after MAIL, RCPT or DATA keeps its own schedule).
-- Changes nothing on a healthy connector with nothing waiting (reset is then NULL).
WITH waiting AS MATERIALIZED (
    SELECT id FROM outbox.message
     WHERE connector_id = %(id)s AND status = 'retry' AND next_attempt_at > now()
       AND phase IN ('token', 'connect', 'ehlo', 'starttls', 'auth')
     ORDER BY id
       FOR UPDATE),
released AS (
    UPDATE outbox.message m
       SET next_attempt_at = now(), updated_at = now()
      FROM waiting w
     WHERE m.id = w.id
    RETURNING m.id),
reset AS (
    UPDATE outbox.connector
       SET failures = 0, backoff_until = NULL, updated_at = now()
     WHERE id = %(id)s
       AND (failures > 0 OR backoff_until IS NOT NULL OR EXISTS (SELECT 1 FROM waiting))
    RETURNING id)
SELECT (SELECT id FROM reset) AS reset, array(SELECT id FROM released ORDER BY id) AS released;

-- release_limit_waits --
-- A connector's limits changed: the messages given back to wait for them (phase 'waiting',
-- not yet due) are due now; the worker applies the new limits to them.
UPDATE outbox.message
   SET next_attempt_at = now(), updated_at = now()
 WHERE connector_id = %(id)s AND status IN ('queued', 'retry') AND phase = 'waiting'
   AND next_attempt_at > now();

-- end_connector_slowdown --
-- End the workers' slow-down of a connector after throttling replies (an operator changed its
-- limits, or reset it): the spacing forgotten, updated_at bumped so every worker reloads the
-- connector at once. Returns the spacing as it was and when it was set (no row: it was not
-- slowed down).
UPDATE outbox.connector c
   SET throttle_interval_seconds = NULL, throttled_at = NULL, updated_at = now()
  FROM (SELECT id, throttle_interval_seconds, throttled_at
          FROM outbox.connector WHERE id = %(id)s FOR UPDATE) AS was
 WHERE c.id = was.id AND was.throttled_at IS NOT NULL
RETURNING was.throttle_interval_seconds, was.throttled_at;

-- insert_connector_event --
-- Activity history of a connector.
INSERT INTO outbox.connector_event (connector_id, connector_name, action, actor, detail)
VALUES (%(connector_id)s, %(connector_name)s, %(action)s, %(actor)s, %(detail)s);

-- status_counts --
-- Messages per status.
SELECT status, count(*) AS n FROM outbox.message GROUP BY status ORDER BY status;

-- status_by_connector --
-- Messages per connector and status (messages not yet routed show under no connector).
SELECT c.name AS connector, m.status, count(*) AS n
  FROM outbox.message m LEFT JOIN outbox.connector c ON c.id = m.connector_id
 GROUP BY c.name, m.status ORDER BY c.name NULLS FIRST, m.status;

-- queue_lag --
-- Age of the oldest due message, and how many are due now.
SELECT extract(epoch FROM now() - min(next_attempt_at)) AS lag_seconds, count(*) AS due
  FROM outbox.message
 WHERE status IN ('queued', 'retry') AND next_attempt_at <= now();

-- message_by_id --
-- One message with its connector's name.
SELECT m.*, c.name AS connector_name,
       (SELECT count(*) FROM outbox.attachment a WHERE a.message_id = m.id) AS attachment_count
  FROM outbox.message m LEFT JOIN outbox.connector c ON c.id = m.connector_id
 WHERE m.id = %(id)s;

-- attempts_of_message --
-- The attempt timeline of one message (a `sent` message's last attempt is read from its row).
SELECT attempt, connector_name, started_at, finished_at, phase, outcome, smtp_code,
       smtp_reply, error,
       round(extract(epoch FROM finished_at - started_at) * 1000)::bigint AS duration_ms
  FROM outbox.attempt_history WHERE message_id = %(id)s ORDER BY id NULLS LAST;

-- recipients_of_message --
-- Per-recipient results of one message (a `sent` message's one recipient may be read from its row).
SELECT addr, status, smtp_code, smtp_reply, updated_at
  FROM outbox.recipient_history WHERE message_id = %(id)s ORDER BY addr;

-- select_messages --
-- Messages an operator action would look at: by id and/or filter. A NULL parameter does not
-- filter. Times (--since/--until) are when the message was last attempted, or created when
-- it never was.
SELECT m.id, m.status, c.name AS connector, m.from_addr, m.to_addrs, m.subject, m.attempts,
       m.replays, m.last_error, m.send_after, m.next_attempt_at, m.last_attempt_at,
       m.created_at, m.updated_at
  FROM outbox.message m LEFT JOIN outbox.connector c ON c.id = m.connector_id
 WHERE (%(ids)s::bigint[] IS NULL OR m.id = ANY(%(ids)s::bigint[]))
   AND (%(statuses)s::text[] IS NULL OR m.status = ANY(%(statuses)s::text[]))
   AND (%(connector)s::text IS NULL OR c.name = %(connector)s::text)
   AND (%(from_addr)s::text IS NULL OR lower(m.from_addr) = lower(%(from_addr)s::text))
   AND (%(since)s::timestamptz IS NULL
        OR coalesce(m.last_attempt_at, m.created_at) >= %(since)s::timestamptz)
   AND (%(until)s::timestamptz IS NULL
        OR coalesce(m.last_attempt_at, m.created_at) < %(until)s::timestamptz)
   AND (%(error_contains)s::text IS NULL
        OR strpos(lower(coalesce(m.last_error, '')), lower(%(error_contains)s::text)) > 0)
 ORDER BY m.id;

-- connectors_backing_off --
-- Of these connector names, the ones backing off now, with until when and why.
SELECT name, backoff_until, last_error
  FROM outbox.connector
 WHERE name = ANY(%(names)s::text[]) AND backoff_until > now()
 ORDER BY name;

-- existing_messages --
-- Which of these ids exist, with their status.
SELECT id, status FROM outbox.message WHERE id = ANY(%(ids)s::bigint[]);

-- db_now --
-- The database's clock (cutoffs are computed on it, not on the client's).
SELECT now();

-- replay_messages --
-- Requeue finished messages for a fresh round of automatic retries, keeping the Message-ID
-- and the attempt history. Only rows still in one of `statuses` are touched (a second,
-- identical replay finds them queued and changes nothing). Recipients that accepted the
-- message are kept, so they never get a second copy, except for a `sent` message (only
-- replayed with --force), which goes to everyone again; refused and pending recipients are
-- forgotten so they are tried again. The attempt counter restarts at 0: a fresh round of
-- automatic retries (and the maximum age counts from the replay).
WITH target AS MATERIALIZED (
    SELECT id, status FROM outbox.message
     WHERE id = ANY(%(ids)s::bigint[]) AND status = ANY(%(statuses)s::text[])
     ORDER BY id
       FOR UPDATE),
cleared AS (
    DELETE FROM outbox.recipient r USING target t
     WHERE r.message_id = t.id AND (t.status = 'sent' OR r.status <> 'sent')
    RETURNING r.message_id),
-- A `sent` message's sending attempt (and its one recipient's result), read from the row until
-- now, is history the replay keeps: it becomes an attempt row, and the recipient is reset.
kept AS (
    INSERT INTO outbox.attempt (message_id, attempt, connector_id, connector_name, started_at,
                                finished_at, phase, outcome, smtp_code, smtp_reply, error)
    SELECT h.message_id, h.attempt, h.connector_id, h.connector_name,
           coalesce(h.started_at, h.finished_at, now()), coalesce(h.finished_at, now()), h.phase,
           h.outcome, h.smtp_code, h.smtp_reply, h.error
      FROM outbox.attempt_history h JOIN target t ON t.id = h.message_id
     WHERE t.status = 'sent' AND h.id IS NULL),
implied AS (
    SELECT h.message_id FROM outbox.recipient_history h JOIN target t ON t.id = h.message_id
     WHERE t.status = 'sent'
       AND NOT EXISTS (SELECT FROM outbox.recipient r WHERE r.message_id = h.message_id)),
replayed AS (
    UPDATE outbox.message m
       SET status = 'queued',
           attempts = 0,
           next_attempt_at = now(), lease_token = NULL, lease_expires_at = NULL, phase = NULL,
           last_error = NULL, last_smtp_code = NULL, last_smtp_reply = NULL,
           first_failed_at = NULL, sent_at = NULL,
           replays = m.replays + 1, replayed_at = now(), updated_at = now()
      FROM target t
     WHERE m.id = t.id
    RETURNING m.id, t.status AS was)
SELECT id, was,
       (SELECT count(*) FROM cleared c WHERE c.message_id = replayed.id)
       + (SELECT count(*) FROM implied i WHERE i.message_id = replayed.id) AS recipients_reset
  FROM replayed ORDER BY id;

-- cancel_messages --
-- Cancel messages not sent yet, only if still in one of `statuses`. A `dispatched` row may be
-- cancelled: its worker claims it only while it is still dispatched under its token, so
-- nothing is sent. A `sending` row is never in `statuses`: the SMTP server may have it.
WITH target AS MATERIALIZED (
    SELECT id, status FROM outbox.message
     WHERE id = ANY(%(ids)s::bigint[]) AND status = ANY(%(statuses)s::text[])
     ORDER BY id
       FOR UPDATE)
UPDATE outbox.message m
   SET status = 'cancelled', lease_token = NULL, lease_expires_at = NULL, updated_at = now()
  FROM target t
 WHERE m.id = t.id
RETURNING m.id, t.status AS was;

-- send_now --
-- Make waiting messages (scheduled or pending retry) due at once; a future send time moves
-- to now.
WITH target AS MATERIALIZED (
    SELECT id, status, send_after, next_attempt_at FROM outbox.message
     WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('queued', 'retry')
     ORDER BY id
       FOR UPDATE)
UPDATE outbox.message m
   SET next_attempt_at = least(m.next_attempt_at, now()),
       send_after = CASE WHEN m.send_after > now() THEN now() ELSE m.send_after END,
       updated_at = now()
  FROM target t
 WHERE m.id = t.id
RETURNING m.id, t.status AS was, t.send_after AS was_send_after, t.next_attempt_at AS was_due;

-- wake_pollers --
-- Wake every poller at once (delivered at commit).
SELECT pg_notify('outbox_message', '');

-- insert_operator_audit --
-- Record an operator action.
INSERT INTO outbox.operator_audit (action, actor, selection, count, message_ids, detail)
VALUES (%(action)s, %(actor)s, %(selection)s, %(count)s, %(message_ids)s, %(detail)s)
RETURNING id;

-- prune_count --
-- What `prune` would delete: finished messages last changed before the cutoff, with their
-- attempts, recipient results and attachments.
WITH doomed AS MATERIALIZED (
    SELECT id FROM outbox.message
     WHERE status IN ('sent', 'partial', 'failed', 'cancelled') AND updated_at < %(cutoff)s)
SELECT (SELECT count(*) FROM doomed) AS messages,
       (SELECT count(*) FROM outbox.attempt a WHERE a.message_id IN (SELECT id FROM doomed)) AS attempts,
       (SELECT count(*) FROM outbox.recipient r WHERE r.message_id IN (SELECT id FROM doomed)) AS recipients,
       (SELECT count(*) FROM outbox.attachment x WHERE x.message_id IN (SELECT id FROM doomed))
           AS attachments;

-- prune_batch --
-- Delete one batch of finished messages and their history (short transaction; rows locked
-- by someone else are left for the next run). The poller's retention uses the same function.
SELECT * FROM outbox.delete_finished(%(cutoff)s, %(batch)s);

-- attempts_last_hour --
-- Attempts per connector and outcome over the last hour: the attempt rows, and the `sent`
-- messages whose sending attempt is read from the row (through message_finished_idx: a row's
-- sent_at is never after its updated_at).
SELECT connector, outcome, sum(n)::bigint AS n
  FROM (SELECT coalesce(a.connector_name, c.name) AS connector, a.outcome, count(*) AS n
          FROM outbox.attempt a LEFT JOIN outbox.connector c ON c.id = a.connector_id
         WHERE a.finished_at > now() - interval '1 hour'
         GROUP BY 1, 2
        UNION ALL
        SELECT c.name, 'sent', count(*)
          FROM outbox.message m LEFT JOIN outbox.connector c ON c.id = m.connector_id
         WHERE m.status = 'sent' AND m.updated_at > now() - interval '1 hour'
           AND m.sent_at > now() - interval '1 hour'
           AND NOT EXISTS (SELECT FROM outbox.attempt a WHERE a.message_id = m.id
                              AND a.outcome = 'sent' AND a.finished_at = m.sent_at)
         GROUP BY 1) x
 GROUP BY 1, 2 ORDER BY 1 NULLS FIRST, 2;

-- status_gauges --
-- Messages per status and the age of the oldest due message (metrics) without reading the whole
-- table: every status but `sent` is counted exactly through a partial index (work in progress is
-- bounded by the backlog, finished problems by retention); `sent`, the bulk of a big table, is
-- the table's row estimate (pg_class.reltuples, kept by autovacuum) less those counts, and
-- counted exactly while the table is small (under 100,000 rows by that estimate).
WITH counted AS MATERIALIZED (
    SELECT status, count(*) AS n FROM outbox.message WHERE status IN ('queued', 'retry') GROUP BY status
    UNION ALL
    SELECT status, count(*) FROM outbox.message WHERE status IN ('dispatched', 'sending') GROUP BY status
    UNION ALL
    SELECT status, count(*) FROM outbox.message WHERE status IN ('held', 'failed', 'partial') GROUP BY status
    UNION ALL
    SELECT 'cancelled', count(*) FROM outbox.message WHERE status = 'cancelled'),
estimate AS (
    SELECT reltuples::bigint AS rows FROM pg_class WHERE oid = 'outbox.message'::regclass),
lag AS (
    SELECT extract(epoch FROM now() - min(next_attempt_at)) AS seconds FROM outbox.message
     WHERE status IN ('queued', 'retry') AND next_attempt_at <= now())
SELECT c.status, c.n, lag.seconds AS lag_seconds FROM counted c, lag
UNION ALL
SELECT 'sent',
       CASE WHEN e.rows < 100000 THEN (SELECT count(*) FROM outbox.message WHERE status = 'sent')
            ELSE greatest(e.rows - (SELECT sum(n) FROM counted), 0)::bigint END,
       lag.seconds
  FROM estimate e, lag;
