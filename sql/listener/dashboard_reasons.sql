-- The dashboard's top bounce reasons of the last 30 days: the reply code and the answer's first
-- 200 characters with addresses replaced, so that the same refusal for many recipients is one
-- reason; the ten most frequent, by messages.
SELECT coalesce(nullif(concat_ws(' ', r.smtp_code::text, r.enhanced_code), ''), coalesce(r.bounce_type::text, 'no code'))
           || ': ' || regexp_replace(left(coalesce(r.response, ''), 200), '[^[:space:]<>()"]+@[^[:space:]<>()"]+', '<address>', 'g')
           AS reason,
       count(DISTINCT r.message_id) AS messages
FROM email.receipts r
WHERE r.event IN ('failed', 'bounced') AND r.at > now() - interval '30 days'
GROUP BY 1
ORDER BY 2 DESC, 1
LIMIT 10
