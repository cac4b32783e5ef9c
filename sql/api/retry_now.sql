-- Makes queued message $1, waiting for a later attempt, due now.
UPDATE email.messages SET next_attempt_at = now(), updated_at = now()
WHERE id = $1 AND status = 'queued'
