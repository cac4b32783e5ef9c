-- Keeps a fetched SNS certificate ($1 url, $2 PEM) for email.ingest_webhook and restarts.
INSERT INTO email.sns_certificates (url, pem) VALUES ($1, $2)
ON CONFLICT (url) DO UPDATE SET pem = excluded.pem, fetched_at = now()
