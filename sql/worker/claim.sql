-- Claims up to $1 due messages for worker slot $3 with a lease of $2 milliseconds, when the
-- queue is backed up: SKIP LOCKED lets several workers share the queue; the materialized CTE
-- locks exactly the rows it picks, best priority first, through the partial index messages_due.
-- The claimed rows become 'sending' under the lease, with one more attempt counted, and come
-- back with everything the worker needs to send them (read by column name).
WITH due AS MATERIALIZED (
    SELECT id FROM email.messages
    WHERE status = 'queued' AND next_attempt_at <= now()
    ORDER BY priority DESC, next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE email.messages m
SET status = 'sending', attempts = m.attempts + 1, lease_until = now() + $2 * interval '1 millisecond',
    claimed_by = $3, updated_at = now()
FROM due
WHERE m.id = due.id
RETURNING m.id, m.attempts AS attempt, m.transport, m.sender, m.recipients, m.cc, m.bcc, m.reply_to, m.subject,
          m.body, m.html, m.template, m.template_version, m.data::text AS data, m.headers::text AS headers,
          m.message_id, m.pending_recipients, m.attachment_count, m.tags, m.metadata::text AS metadata,
          m.track_opens, m.track_clicks, m.list_unsubscribe, m.raw
