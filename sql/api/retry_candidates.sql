-- The messages email.retry_all acts on: status in $1, through transport $2 (NULL: any), last
-- changed at or after $3 (NULL: ever), that role $4 may act on; oldest first.
SELECT m.id
FROM email.messages m
WHERE m.status = ANY ($1::email.status[])
  AND ($2::text IS NULL OR m.transport = $2)
  AND ($3::timestamptz IS NULL OR m.updated_at >= $3)
  AND (m.created_by = $4 OR email._may_act_on_all($4))
ORDER BY m.id
