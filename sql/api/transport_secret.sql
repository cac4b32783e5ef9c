-- The full DSN of transport $1 (secret included; owner only), for email.test_transport.
SELECT dsn FROM email.transport_secrets WHERE name = $1
