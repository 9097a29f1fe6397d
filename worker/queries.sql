-- claim_due --
-- Claim up to `limit` due rows for dispatch under a lease, and never more than keeps the rows
-- in flight (dispatched or sending) within `max_in_flight`: a backlog larger than the workers
-- get through in a lease waits here, in the table, instead of expiring in Redis. The count
-- reads only the partial index message_lease_idx (in-flight rows, at most about the cap).
-- The locked subset is materialised first so the planner cannot re-run it and claim more.
WITH due AS MATERIALIZED (
    SELECT id FROM outbox.message
     WHERE status IN ('queued', 'retry') AND next_attempt_at <= now()
     ORDER BY priority DESC, next_attempt_at, id
     LIMIT greatest(0, least(%(limit)s, %(max_in_flight)s - (
               SELECT count(*) FROM outbox.message WHERE status IN ('dispatched', 'sending'))))
       FOR UPDATE SKIP LOCKED)
UPDATE outbox.message m
   SET status = 'dispatched', lease_token = gen_random_uuid(),
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s), updated_at = now()
  FROM due
 WHERE m.id = due.id
RETURNING m.id, m.lease_token::text;

-- reap_expired --
-- Rows whose lease expired (worker died, Redis lost its keys) go back to the queue. A row lost
-- while `sending` counts its attempt, unless its worker had recorded no SMTP progress for it
-- (phase 'claimed', or 'waiting' for its connector as lease renewals record): that attempt is
-- given back, twice at most per message, so one that kills its worker every time still runs
-- out. Lost after DATA began it is ambiguous (the server may have it): retried, or failed for
-- an operator when ambiguous_policy is 'hold'. The rule is outbox/core/policy.py `after_lease_expired`;
-- tests/integration/test_vocabulary.py checks this statement against it case by case.
WITH lost AS MATERIALIZED (
    SELECT id, status AS was, phase AS was_phase, attempts, connector_id,
           status = 'sending' AND phase IN ('data', 'dot') AS ambiguous,
           status = 'sending' AND phase IN ('claimed', 'waiting') AS unstarted
      FROM outbox.message
     WHERE status IN ('dispatched', 'sending') AND lease_expires_at < now()
     ORDER BY lease_expires_at
     LIMIT 1000
       FOR UPDATE SKIP LOCKED),
expired AS MATERIALIZED (
    SELECT l.id, l.was, l.was_phase, l.connector_id, l.ambiguous,
           l.attempts - w.refund AS attempts, w.refund = 1 AS waited
      FROM lost l
     CROSS JOIN LATERAL (
        SELECT CASE WHEN l.unstarted AND l.attempts > 0 AND (
                   SELECT count(*) FROM outbox.attempt a
                    WHERE a.message_id = l.id AND a.outcome = 'lease-expired'
                      AND a.phase IN ('claimed', 'waiting')) < 2
               THEN 1 ELSE 0 END AS refund) w),
moved AS (
    UPDATE outbox.message m
       SET status = CASE
                WHEN e.ambiguous AND %(ambiguous_policy)s = 'hold' THEN 'failed'
                WHEN e.was = 'sending' AND NOT e.waited AND e.attempts >= %(max_attempts)s THEN 'failed'
                WHEN e.attempts = 0 THEN 'queued'
                ELSE 'retry' END,
           attempts = e.attempts,
           last_error = CASE WHEN e.waited
                THEN 'worker lost ' || CASE WHEN e.was_phase = 'waiting'
                     THEN 'while waiting for its connector' ELSE 'before it reported progress' END
                     || ' (lease expired); no attempt spent'
                WHEN e.was = 'sending'
                THEN 'worker lost during ' || coalesce(e.was_phase, 'sending') || ' (lease expired)'
                     || CASE
                        WHEN e.ambiguous AND %(ambiguous_policy)s = 'hold'
                            THEN '; ambiguous: the server may have it; held for an operator'
                        WHEN e.attempts >= %(max_attempts)s THEN '; attempts exhausted'
                        ELSE '' END
                ELSE m.last_error END,
           first_failed_at = CASE WHEN e.was = 'sending' AND NOT e.waited
                THEN coalesce(m.first_failed_at, now())
                ELSE m.first_failed_at END,
           next_attempt_at = now(), lease_token = NULL, lease_expires_at = NULL,
           updated_at = now()
      FROM expired e
     WHERE m.id = e.id
    RETURNING m.id, m.status),
history AS (
    INSERT INTO outbox.attempt (message_id, attempt, connector_id, started_at, phase, outcome, error)
    SELECT e.id, e.attempts + e.waited::int, e.connector_id, now(), e.was_phase,
           CASE WHEN e.ambiguous THEN 'ambiguous' ELSE 'lease-expired' END,
           'lease expired while sending (phase ' || coalesce(e.was_phase, 'unknown') || ')'
      FROM expired e WHERE e.was = 'sending')
SELECT count(*) FILTER (WHERE e.was = 'dispatched') AS dispatched,
       count(*) FILTER (WHERE e.was = 'sending') AS sending,
       count(*) FILTER (WHERE m.status = 'failed') AS failed
  FROM expired e JOIN moved m USING (id);

-- release_held --
-- Held messages whose connector is enabled again (or gone) go back to the queue.
UPDATE outbox.message m
   SET status = CASE WHEN m.attempts = 0 THEN 'queued' ELSE 'retry' END,
       next_attempt_at = now(), updated_at = now()
 WHERE m.status = 'held'
   AND (m.connector_id IS NULL
        OR EXISTS (SELECT 1 FROM outbox.connector c WHERE c.id = m.connector_id AND c.enabled));

-- seconds_to_next_due --
-- How long until the next waiting row is due (NULL when none waits).
SELECT extract(epoch FROM min(next_attempt_at) - now()) AS seconds
  FROM outbox.message WHERE status IN ('queued', 'retry');

-- claim --
-- A worker claims the rows it was handed, only if they are still dispatched under the token
-- it received (a duplicate or stale broker delivery claims nothing). The attempt is counted
-- here, in Postgres, so a message that kills its worker every time still runs out.
-- One statement that commits on its own: a worker stopped or stalled right after sending it
-- holds no row locks (a transaction spanning several client messages would keep its locks
-- until the stalled process sent the rest). `locked` waits for the poller's transaction that
-- dispatched these rows (the broker may deliver the ids first) and, under READ COMMITTED,
-- returns each row as that transaction committed it, which the update then re-checks. The
-- reply is small (ids and new tokens); the rows themselves are read by `claimed`.
WITH locked AS MATERIALIZED (
    SELECT id, status, lease_token FROM outbox.message
     WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE)
UPDATE outbox.message m
   SET status = 'sending', attempts = m.attempts + 1, lease_token = gen_random_uuid(),
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
       phase = 'claimed', last_attempt_at = now(), updated_at = now()
  FROM locked l JOIN unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS d(id, token) ON d.id = l.id
 WHERE m.id = l.id AND l.status = 'dispatched' AND l.lease_token = d.token
RETURNING m.id, m.lease_token::text;

-- claimed --
-- The rows a claim just took, under the tokens it gave them (read after it committed), each
-- with the configuration's version: it moves whenever an operator changes a connector or a
-- setting (ConfigCache.get computes the same three values from what it reads).
SELECT m.id, m.from_addr, m.from_name, m.to_addrs, m.cc_addrs, m.bcc_addrs, m.reply_to,
       m.subject, m.text_body, m.html_body, m.headers, m.importance, m.message_id,
       m.reference, m.idempotency_key, m.attempts, m.created_at, m.lease_token, m.system_generated, m.content,
       m.replays, coalesce(m.replayed_at, m.created_at) AS round_started_at,
       EXISTS (SELECT 1 FROM outbox.attachment a WHERE a.message_id = m.id) AS has_attachments,
       v.connectors_changed_at, v.connectors, v.settings_changed_at
  FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS c(id, token)
  JOIN outbox.message m ON m.id = c.id AND m.lease_token = c.token AND m.status = 'sending'
 CROSS JOIN (SELECT (SELECT max(updated_at) FROM outbox.connector) AS connectors_changed_at,
                    (SELECT count(*) FROM outbox.connector) AS connectors,
                    (SELECT updated_at FROM outbox.settings) AS settings_changed_at) v
 ORDER BY m.id;

-- attachments_of --
-- Attachments of the claimed messages.
SELECT message_id, filename, content_type, content
  FROM outbox.attachment WHERE message_id = ANY(%(ids)s) ORDER BY id;

-- finished_recipients_of --
-- Recipients that earlier attempts settled for good (never sent to again).
SELECT message_id, addr, status, smtp_code, smtp_reply
  FROM outbox.recipient
 WHERE message_id = ANY(%(ids)s) AND status IN ('sent', 'failed');

-- connectors --
-- Every connector (resolution happens in Python, per batch).
SELECT * FROM outbox.connector;

-- settings --
-- Instance-wide settings.
SELECT * FROM outbox.settings;

-- set_phase --
-- Record how far the SMTP conversation got (read when a lease expires mid-send); matches
-- nothing once the lease is lost or expired.
UPDATE outbox.message SET phase = %(phase)s
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND status = 'sending'
   AND lease_expires_at > now();

-- renew_leases --
-- Extend the leases of rows still in flight (only while this worker holds them) and record how
-- far each got; a phase past DATA is never taken back (it makes a lost row ambiguous).
-- Returns the ids renewed.
UPDATE outbox.message m
   SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
       phase = CASE WHEN m.phase IN ('data', 'dot') THEN m.phase ELSE r.phase END
  FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(phases)s::text[]) AS r(id, token, phase)
 WHERE m.id = r.id AND m.lease_token = r.token AND m.status = 'sending'
RETURNING m.id;

-- finish_attempts --
-- Write the outcomes of a batch of attempts in one statement, each only while this worker
-- still holds that row's lease (fencing): the rows, their attempt history and their
-- per-recipient results. The batch comes as two JSON arrays of records (cheaper to send than
-- one array per column). Returns the ids written (a row whose lease was lost is left out).
-- A message given back to wait for its connector's limits (outcome 'waiting') was not
-- attempted: its row says why and until when, its history gets nothing.
-- A delivery's success is written on the row only (views outbox.attempt_history and
-- outbox.recipient_history read it back): a `sent` attempt gets no attempt row (the row holds
-- its number, connector, start, phase and reply), and its recipient no row when it was the
-- message's one address and the message has no recipient rows yet (`implied_recipient`, set
-- by the worker; the row holds the reply).
WITH outcome AS (
    SELECT *
      FROM jsonb_to_recordset(%(outcomes)s::jsonb)
        AS o(id bigint, lease_token uuid, status text, refund int, next_attempt_at timestamptz,
             connector_id int, connector_name text, phase text, outcome text, last_error text,
             smtp_code int, smtp_reply text, failure bool, started_at timestamptz,
             implied_recipient bool)),
done AS (
    UPDATE outbox.message m
       SET status = o.status,
           attempts = m.attempts - o.refund,
           next_attempt_at = coalesce(o.next_attempt_at, m.next_attempt_at),
           connector_id = coalesce(o.connector_id, m.connector_id),
           phase = o.phase, last_error = o.last_error,
           last_smtp_code = o.smtp_code, last_smtp_reply = o.smtp_reply,
           sent_at = CASE WHEN o.status IN ('sent', 'partial') THEN now() ELSE m.sent_at END,
           first_failed_at = CASE WHEN o.failure THEN coalesce(m.first_failed_at, now())
                             ELSE m.first_failed_at END,
           last_attempt_at = CASE WHEN o.outcome = 'sent' THEN coalesce(o.started_at, m.last_attempt_at)
                             ELSE m.last_attempt_at END,
           lease_token = NULL, lease_expires_at = NULL, updated_at = now()
      FROM outcome o
     WHERE m.id = o.id AND m.lease_token = o.lease_token AND m.status = 'sending'
    RETURNING m.id, m.attempts),
history AS (
    INSERT INTO outbox.attempt (message_id, attempt, connector_id, connector_name, started_at,
                                phase, outcome, smtp_code, smtp_reply, error)
    SELECT o.id, done.attempts + o.refund, o.connector_id, o.connector_name, o.started_at,
           o.phase, o.outcome, o.smtp_code, o.smtp_reply, o.last_error
      FROM done JOIN outcome o USING (id)
     WHERE o.outcome <> 'waiting'
       AND NOT (o.outcome = 'sent' AND o.refund = 0 AND o.connector_id IS NOT NULL)),
results AS (
    INSERT INTO outbox.recipient (message_id, addr, status, smtp_code, smtp_reply)
    SELECT r.message_id, r.addr, r.status, r.code, r.reply
      FROM jsonb_to_recordset(%(recipients)s::jsonb)
           AS r(message_id bigint, addr text, status text, code int, reply text)
      JOIN done ON done.id = r.message_id
      JOIN outcome o ON o.id = r.message_id
     WHERE NOT (o.implied_recipient AND o.status = 'sent' AND r.status = 'sent'
                AND NOT EXISTS (SELECT FROM outbox.recipient x WHERE x.message_id = r.message_id))
    ON CONFLICT (message_id, addr) DO UPDATE
       SET status = EXCLUDED.status, smtp_code = EXCLUDED.smtp_code,
           smtp_reply = EXCLUDED.smtp_reply, updated_at = now())
SELECT id FROM done;

-- pending_work --
-- What the pipeline has to move now: due, or in flight (later retries and schedules wait).
SELECT count(*) FILTER (WHERE status IN ('queued', 'retry') AND next_attempt_at <= now()) AS due,
       count(*) FILTER (WHERE status IN ('dispatched', 'sending')) AS in_flight
  FROM outbox.message
 WHERE status IN ('queued', 'retry', 'dispatched', 'sending');

-- connector_failed --
-- A failure before MAIL (token, connect, TLS, AUTH): back the connector off (once per backoff
-- window, however many messages hit it at the same time) and say so in its activity history;
-- returns when it is due again.
WITH bumped AS (
    UPDATE outbox.connector
       SET failures = failures + 1, last_error = %(error)s, last_error_at = now(),
           backoff_until = now() + make_interval(
               secs => least(%(max_seconds)s, %(base_seconds)s * 2 ^ least(failures, 30)))
     WHERE id = %(id)s AND (backoff_until IS NULL OR backoff_until <= now())
    RETURNING id, name, failures, backoff_until),
event AS (
    INSERT INTO outbox.connector_event (connector_id, connector_name, action, actor, detail)
    SELECT id, name, 'backing off', 'worker',
           jsonb_build_object('error', %(error)s, 'failures', failures, 'until', backoff_until)
      FROM bumped)
SELECT coalesce((SELECT backoff_until FROM bumped),
                (SELECT backoff_until FROM outbox.connector WHERE id = %(id)s)) AS backoff_until,
       EXISTS (SELECT 1 FROM bumped) AS bumped;

-- connector_recovered --
-- A message went through: the connector is healthy again.
UPDATE outbox.connector SET failures = 0, backoff_until = NULL
 WHERE id = %(id)s AND (failures > 0 OR backoff_until IS NOT NULL);

-- run_summary --
-- What a `run --until-idle` finished (rows that reached a final status since it started), and
-- what still waits for a later retry or a schedule.
SELECT count(*) FILTER (WHERE status = 'sent' AND updated_at >= %(since)s) AS sent,
       count(*) FILTER (WHERE status = 'partial' AND updated_at >= %(since)s) AS partial,
       count(*) FILTER (WHERE status = 'failed' AND updated_at >= %(since)s) AS failed,
       count(*) FILTER (WHERE status IN ('queued', 'retry')) AS waiting
  FROM outbox.message
 WHERE status IN ('queued', 'retry') OR updated_at >= %(since)s;

-- retention_messages --
-- Retention (retention-days): one batch of finished messages older than that, with their
-- attempts, recipient results and attachments (the function `outbox prune` uses too).
SELECT messages, attempts, recipients, attachments
  FROM outbox.delete_finished(now() - make_interval(days => %(days)s), %(batch)s);

-- retention_history --
-- Retention (audit-retention-days): one batch of connector activity and operator audit rows.
SELECT connector_events, audits
  FROM outbox.delete_old_history(now() - make_interval(days => %(days)s), %(batch)s);

-- connector_throttled --
-- A throttling reply: slow the connector down (the spacing between sends doubles, from
-- %(first)s, at most %(max)s seconds), once per reaction time (its current spacing, at least a
-- second) however many replies say so at once, and say so in its activity history. The
-- current spacing decays by half every %(half_life)s seconds (outbox/core/limits.py `slowdown`).
WITH current AS (
    SELECT id, CASE WHEN throttled_at IS NULL OR throttle_interval_seconds IS NULL THEN 0
                    ELSE throttle_interval_seconds * power(0.5,
                         extract(epoch FROM now() - throttled_at) / %(half_life)s::float8) END AS spacing
      FROM outbox.connector WHERE id = %(id)s::bigint),
stepped AS (
    UPDATE outbox.connector c
       SET throttle_interval_seconds = least(%(max)s::float8, greatest(%(first)s::float8, 2 * current.spacing)),
           throttled_at = now()
      FROM current
     WHERE c.id = current.id
       AND (c.throttled_at IS NULL
            OR c.throttled_at <= now() - make_interval(secs => greatest(1, current.spacing)))
    RETURNING c.id, c.name, c.throttle_interval_seconds),
event AS (
    INSERT INTO outbox.connector_event (connector_id, connector_name, action, actor, detail)
    SELECT id, name, 'slowed down', 'worker',
           jsonb_build_object('reply', %(reply)s::text, 'interval_seconds', throttle_interval_seconds)
      FROM stepped)
SELECT throttle_interval_seconds FROM stepped;
