-- Claims like claim.sql, for when few rows are due: the oldest $4 due rows are found through
-- messages_next (a range scan bounded by now(), not a walk past every future row), and the
-- batch of up to $1 is taken from them by priority. When fewer than $4 rows are due this is
-- the exact priority order; the worker switches to claim.sql as soon as a batch comes back full.
WITH window_ AS MATERIALIZED (
    SELECT id FROM email.messages
    WHERE status = 'queued' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $4
), due AS MATERIALIZED (
    SELECT m.id FROM email.messages m JOIN window_ w ON w.id = m.id
    WHERE m.status = 'queued' AND m.next_attempt_at <= now()
    ORDER BY m.priority DESC, m.next_attempt_at
    LIMIT $1
    FOR UPDATE OF m SKIP LOCKED
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
