-- Requeues message $1 for a fresh series of attempts, due now, to the recipients $2 (NULL: all).
UPDATE email.messages
SET status = 'queued', attempts = 0, next_attempt_at = now(), lease_until = NULL, last_error = NULL,
    pending_recipients = $2, updated_at = now()
WHERE id = $1
