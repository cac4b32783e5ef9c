-- Every transport with its secret DSN, for building the transports (worker only).
SELECT t.name, t.fallback, s.dsn
FROM email.transports t
JOIN email.transport_secrets s USING (name)
