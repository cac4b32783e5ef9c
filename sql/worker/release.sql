-- Puts rows this worker claimed but did not send ($1: ids; at shutdown) back in the queue,
-- without counting the attempt.
UPDATE email.messages
SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_until = NULL, claimed_by = NULL,
    next_attempt_at = now(), updated_at = now()
WHERE id = ANY ($1) AND status = 'sending'
