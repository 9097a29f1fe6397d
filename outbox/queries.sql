-- insert_message --
-- Insert one validated message unless it is over the size limit (system mail is exempt) or
-- its idempotency key exists; returns the new id (or NULL) and the size limit in force.
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
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id)
SELECT (SELECT id FROM ins) AS id, (SELECT max_message_bytes FROM limits) AS max_message_bytes;

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
    password_enc, ca_file, enabled, is_default_gateway, max_connections, timeout_seconds)
VALUES (%(name)s, %(direction)s, %(address)s, %(aliases)s, %(host)s, %(port)s, %(security)s,
        %(username)s, %(password_env)s, %(password_enc)s, %(ca_file)s, %(enabled)s,
        %(is_default_gateway)s, %(max_connections)s, %(timeout_seconds)s)
RETURNING id;

-- set_connector_password --
-- Store a re-encrypted password.
UPDATE outbox.connector SET password_enc = %(password_enc)s, updated_at = now()
 WHERE id = %(id)s;

-- set_connector_enabled --
-- Enable or disable a connector.
UPDATE outbox.connector SET enabled = %(enabled)s, updated_at = now()
 WHERE id = %(id)s;

-- release_held --
-- Messages held for a connector go back to the queue when it is enabled.
WITH released AS (
    UPDATE outbox.message
       SET status = CASE WHEN attempts = 0 THEN 'queued' ELSE 'retry' END,
           next_attempt_at = now(), updated_at = now()
     WHERE status = 'held' AND connector_id = %(id)s
    RETURNING id)
SELECT count(*) AS released, pg_notify('outbox_message', '') FROM released;

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
-- The attempt timeline of one message.
SELECT attempt, connector_name, started_at, finished_at, phase, outcome, smtp_code,
       smtp_reply, error,
       round(extract(epoch FROM finished_at - started_at) * 1000)::bigint AS duration_ms
  FROM outbox.attempt WHERE message_id = %(id)s ORDER BY id;

-- recipients_of_message --
-- Per-recipient results of one message.
SELECT addr, status, smtp_code, smtp_reply, updated_at
  FROM outbox.recipient WHERE message_id = %(id)s ORDER BY addr;
