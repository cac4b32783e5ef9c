-- Message $1 as email.retry needs it, locked, if role $2 may act on it (it queued the message,
-- or it is a member of the extension owner's role). `waiting`: deferred, queued for a later
-- attempt (not a message scheduled with send_at that was never tried).
SELECT m.id, m.status::text AS status, m.transport, m.recipients, m.cc, m.bcc,
       (m.status = 'queued' AND m.attempts > 0 AND m.next_attempt_at > now()) AS waiting
FROM email.messages m
WHERE m.id = $1
  AND (m.created_by = $2
       OR pg_has_role($2, (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'pg_email'), 'MEMBER'))
FOR UPDATE
