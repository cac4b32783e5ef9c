-- The second half of both claim statements: mark the picked rows as being sent, under a lease
-- of $2 milliseconds for worker slot $3, and return what the worker needs to send them.
UPDATE email.messages m
SET status = 'sending', attempts = m.attempts + 1, lease_until = now() + $2 * interval '1 millisecond',
    claimed_by = $3, updated_at = now()
FROM due
WHERE m.id = due.id
RETURNING m.id, m.attempts, m.transport, m.sender, m.recipients, m.cc, m.bcc, m.reply_to, m.subject,
          m.body, m.html, m.template, m.template_version, m.data::text, m.headers::text, m.message_id,
          m.pending_recipients, m.attachment_count, m.tags, m.metadata::text
