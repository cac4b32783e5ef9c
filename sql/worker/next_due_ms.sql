-- Milliseconds until the earliest queued message is due (0 when one is due now; NULL when the
-- queue is empty), for the worker's sleep.
SELECT greatest(extract(epoch FROM min(next_attempt_at) - now()) * 1000, 0)::float8
FROM email.messages
WHERE status = 'queued'
