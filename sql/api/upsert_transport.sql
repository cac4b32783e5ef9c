-- Registers or replaces transport $1: the public half, with the DSN masked ($3). What a call
-- leaves NULL is kept on a replace: $4 (is_default; false for a new transport) and $5
-- (fallback; '' removes it).
INSERT INTO email.transports AS t (name, kind, dsn, is_default, fallback, sender)
VALUES ($1, $2, $3, coalesce($4, false), nullif($5, ''), $6)
ON CONFLICT (name) DO UPDATE
SET kind = EXCLUDED.kind, dsn = EXCLUDED.dsn, is_default = coalesce($4, t.is_default),
    fallback = CASE WHEN $5 IS NULL THEN t.fallback ELSE nullif($5, '') END,
    sender = EXCLUDED.sender, updated_at = EXCLUDED.updated_at
