-- Every transport with its secret DSN: the listener reads the webhook settings from them.
SELECT t.name, s.dsn
FROM email.transports t
JOIN email.transport_secrets s USING (name)
