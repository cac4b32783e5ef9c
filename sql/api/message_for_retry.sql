-- Message $1 as email.retry needs it, locked, if role $2 may act on it (it queued it, or
-- email._may_act_on_all).
-- `waiting`: deferred, queued for a later attempt (not a message scheduled with send_at that was
-- never tried). `topic_default`: its topic's default_subscribed (NULL: no topic, or deleted).
SELECT m.id, m.status::text AS status, m.transport, m.recipients, m.cc, m.bcc, m.topic,
       (SELECT t.default_subscribed FROM email.topics t WHERE t.name = m.topic) AS topic_default,
       (m.status = 'queued' AND m.attempts > 0 AND m.next_attempt_at > now()) AS waiting
FROM email.messages m
WHERE m.id = $1
  AND (m.created_by = $2 OR email._may_act_on_all($2))
FOR UPDATE OF m
