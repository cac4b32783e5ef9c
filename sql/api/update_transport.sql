-- Changes what a call gives of transport $1 and keeps the rest: $2 (is_default) and $3
-- (fallback; '' removes it), NULL meaning keep. Returns the name when the transport exists.
UPDATE email.transports t
SET is_default = coalesce($2, t.is_default),
    fallback = CASE WHEN $3 IS NULL THEN t.fallback ELSE nullif($3, '') END,
    updated_at = now()
WHERE t.name = $1
RETURNING t.name
