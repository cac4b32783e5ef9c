-- The keys that sign and verify tracking and unsubscribe tokens (owner-only table), oldest
-- first: the last one signs.
SELECT kid, secret FROM email.tracking_keys ORDER BY created_at, kid
