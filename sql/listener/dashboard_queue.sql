-- The dashboard's queue: per transport, messages waiting, due now, being sent, and how long the
-- oldest due one has waited (seconds; NULL when none is due).
SELECT transport,
       count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'queued' AND next_attempt_at <= now()) AS due_now,
       count(*) FILTER (WHERE status = 'sending') AS sending,
       extract(epoch FROM now() - min(next_attempt_at) FILTER (WHERE status = 'queued' AND next_attempt_at <= now()))::float8
           AS oldest_due_secs
FROM email.messages
WHERE status IN ('queued', 'sending')
GROUP BY transport
ORDER BY transport
