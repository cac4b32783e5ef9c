-- Registers or replaces transport $1: the public half, with the DSN masked ($3).
INSERT INTO email.transports (name, kind, dsn, is_default, fallback, sender)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (name) DO UPDATE
SET kind = EXCLUDED.kind, dsn = EXCLUDED.dsn, is_default = EXCLUDED.is_default,
    fallback = EXCLUDED.fallback, sender = EXCLUDED.sender, updated_at = now()
