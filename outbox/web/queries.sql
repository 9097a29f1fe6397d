-- insert_user --
-- Create a web console user (nothing when the name is taken).
INSERT INTO outbox.web_user (name, role, password_hash)
VALUES (%(name)s, %(role)s, %(password_hash)s)
ON CONFLICT (name) DO NOTHING
RETURNING id;

-- set_user_password --
-- Replace a user's password hash.
UPDATE outbox.web_user SET password_hash = %(password_hash)s, updated_at = now()
 WHERE name = %(name)s
RETURNING id;

-- delete_user --
-- Remove a user.
DELETE FROM outbox.web_user WHERE name = %(name)s RETURNING id;

-- users --
-- Every user, without the hashes.
SELECT name, role, created_at, updated_at FROM outbox.web_user ORDER BY name;

-- user_by_name --
-- One user with the hash (for logging in and checking a session).
SELECT name, role, password_hash FROM outbox.web_user WHERE name = %(name)s;

-- list_messages --
-- A page of the Outbox or Sent Items view ({view}), newest first ({direction} DESC) or, for
-- the page before, oldest first; keyset-paginated on id. A NULL parameter does not filter.
-- From, recipient and subject match a part, in any case; the time range is on {time_column}.
-- `max_id` keeps "everything matching this filter" to what the operator was shown. {order} is
-- `v.id`, or `v.id + 0` to keep the planner from walking the primary key backwards through
-- the whole table for a rare match (the Outbox's rows are found through their indexes first).
SELECT {columns}
  FROM {view} v
 WHERE (%(status)s::text IS NULL OR v.status = %(status)s::text)
   AND (%(connector)s::text IS NULL OR v.connector = %(connector)s::text)
   AND (%(from_addr)s::text IS NULL OR strpos(lower(v.from_addr), lower(%(from_addr)s::text)) > 0)
   AND (%(recipient)s::text IS NULL
        OR strpos(lower(v.to_list), lower(%(recipient)s::text)) > 0)
   AND (%(subject)s::text IS NULL OR strpos(lower(v.subject), lower(%(subject)s::text)) > 0)
   AND (%(since)s::timestamptz IS NULL OR v.{time_column} >= %(since)s::timestamptz)
   AND (%(until)s::timestamptz IS NULL OR v.{time_column} < %(until)s::timestamptz)
   AND (%(before)s::bigint IS NULL OR v.id < %(before)s::bigint)
   AND (%(after)s::bigint IS NULL OR v.id > %(after)s::bigint)
   AND (%(max_id)s::bigint IS NULL OR v.id <= %(max_id)s::bigint)
 ORDER BY {order} {direction}
 LIMIT %(limit)s;

-- outbox_counts --
-- The Outbox's rows per status as outbox.outbox_view selects them (scheduled: queued with a
-- future send_after), each counted up to `cap`: a big table is never counted whole, and each
-- count reads one partial index (message_attention_idx, message_scheduled_idx).
SELECT 'failed' AS status, (SELECT count(*) FROM (SELECT 1 FROM outbox.message WHERE status = 'failed' LIMIT %(cap)s) x) AS n
UNION ALL SELECT 'retry', (SELECT count(*) FROM (SELECT 1 FROM outbox.message WHERE status = 'retry' LIMIT %(cap)s) x)
UNION ALL SELECT 'queued', (SELECT count(*) FROM (SELECT 1 FROM outbox.message WHERE status = 'queued' AND send_after > now() LIMIT %(cap)s) x)
UNION ALL SELECT 'held', (SELECT count(*) FROM (SELECT 1 FROM outbox.message WHERE status = 'held' LIMIT %(cap)s) x);

-- sent_counts --
-- Sent Items' rows per status, each counted up to `cap`.
SELECT 'sent' AS status, (SELECT count(*) FROM (SELECT 1 FROM outbox.message WHERE status = 'sent' LIMIT %(cap)s) x) AS n
UNION ALL SELECT 'partial', (SELECT count(*) FROM (SELECT 1 FROM outbox.message WHERE status = 'partial' LIMIT %(cap)s) x);

-- attachments_of_message --
-- A message's attachments without their content.
SELECT filename, content_type, octet_length(content) AS size_bytes
  FROM outbox.attachment WHERE message_id = %(id)s ORDER BY id;

-- attachments_with_content --
-- A message's attachments, for its raw .eml.
SELECT filename, content_type, content FROM outbox.attachment WHERE message_id = %(id)s ORDER BY id;

-- message_bodies --
-- A message's bodies, custom headers and the wire form rendered at enqueue (if kept).
SELECT text_body, html_body, headers, content FROM outbox.message WHERE id = %(id)s;

-- connector_health --
-- Sends and failures in the last hour per outbound connector.
SELECT connector, sent_last_hour, failed_last_hour, last_success_at, held, pending_retry
  FROM outbox.connector_health;

-- operator_audit --
-- Operator actions, newest first, keyset-paginated.
SELECT id, at, actor, action, count, selection, message_ids
  FROM outbox.operator_audit
 WHERE (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
 ORDER BY id DESC LIMIT %(limit)s;

-- connector_events --
-- Connector activity (created, changed, enabled, disabled, backoff reset), newest first.
SELECT at, connector_name, action, actor, detail
  FROM outbox.connector_event ORDER BY id DESC LIMIT %(limit)s;
