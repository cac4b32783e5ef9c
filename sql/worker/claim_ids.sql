-- Claims the messages $1 (ids from citus_due.sql) for claimer $3 with a lease of $2
-- milliseconds, like claim.sql: a row another claimer took meanwhile is no longer 'queued' and
-- is left out. Citus routes the UPDATE to the shards that hold those ids.
UPDATE email.messages m
SET status = 'sending', attempts = m.attempts + 1, lease_until = now() + $2 * interval '1 millisecond',
    claimed_by = $3, updated_at = now()
WHERE m.id = ANY ($1) AND m.status = 'queued'
RETURNING m.id, m.attempts AS attempt, m.transport, m.sender, m.recipients, m.cc, m.bcc, m.reply_to, m.subject,
          m.body, m.html, m.template, m.template_version, m.data::text AS data, m.headers::text AS headers,
          m.message_id, m.pending_recipients, m.attachment_count, m.tags, m.metadata::text AS metadata,
          m.track_opens, m.track_clicks, m.list_unsubscribe, m.raw
