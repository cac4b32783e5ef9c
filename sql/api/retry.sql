-- Requeues message $1 for a fresh series of attempts if it failed or bounced and role $2 may
-- act on it (it queued the message, or it is a member of the extension owner's role).
-- Returns the id when it was requeued, no row otherwise.
UPDATE email.messages m
SET status = 'queued', attempts = 0, next_attempt_at = now(), lease_until = NULL, last_error = NULL,
    updated_at = now()
WHERE m.id = $1 AND m.status IN ('failed', 'bounced')
  AND (m.created_by = $2
       OR pg_has_role($2, (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'pg_email'), 'MEMBER'))
RETURNING m.id
