-- The dashboard's charts: per UTC hour of the last 24 hours ($1 = 'hour') or per UTC day of the
-- last 30 days ($1 = 'day'), oldest first, empty buckets included: the messages sent then and
-- what they did since, by the definitions of email.stats (email._engagement, which includes the
-- receipts not folded into the rollup yet).
WITH buckets AS (
    SELECT g AS start,
           to_char(g AT TIME ZONE 'UTC', CASE WHEN $1 = 'hour' THEN 'HH24:00' ELSE 'YYYY-MM-DD' END) AS label
    FROM generate_series(
        date_trunc($1, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
            - CASE WHEN $1 = 'hour' THEN interval '23 hours' ELSE interval '29 days' END,
        date_trunc($1, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
        CASE WHEN $1 = 'hour' THEN interval '1 hour' ELSE interval '1 day' END) AS g
), recent AS (
    SELECT e.* FROM email._engagement e
    WHERE e.sent_at >= (SELECT min(start) FROM buckets)
)
SELECT b.label,
       count(e.message_id) AS sent,
       count(*) FILTER (WHERE e.delivered) AS delivered,
       count(*) FILTER (WHERE e.bounced) AS bounced,
       count(*) FILTER (WHERE e.complained) AS complained,
       count(*) FILTER (WHERE e.opened) AS opened,
       count(*) FILTER (WHERE e.clicked) AS clicked
FROM buckets b
LEFT JOIN recent e
       ON e.sent_at >= b.start
      AND e.sent_at < b.start + CASE WHEN $1 = 'hour' THEN interval '1 hour' ELSE interval '1 day' END
GROUP BY b.start, b.label
ORDER BY b.start
