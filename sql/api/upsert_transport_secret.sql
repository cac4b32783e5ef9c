-- The secret half of transport $1: the full DSN ($2), readable by the extension's owner only.
INSERT INTO email.transport_secrets (name, dsn) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET dsn = EXCLUDED.dsn
