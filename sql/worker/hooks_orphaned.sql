-- Claimed deliveries ($1) whose event is gone (hooks_events.sql found no receipt or webhook):
-- failed, never posted.
UPDATE email.webhook_deliveries
SET status = 'failed', last_error = 'its event or webhook no longer exists', lease_until = NULL
WHERE id = ANY ($1) AND status = 'queued'
