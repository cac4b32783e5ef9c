-- Message $1 will not be retried: every recipient is on the suppression list.
UPDATE email.messages SET status = 'suppressed', last_error = NULL, updated_at = now()
WHERE id = $1
