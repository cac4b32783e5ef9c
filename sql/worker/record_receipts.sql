-- Inserts a batch of receipts ($1: jsonb array of deliver::outcome::Receipt).
INSERT INTO email.receipts (message_id, event, transport, attempt, recipient, smtp_code, enhanced_code,
                            provider_code, response, provider_message_id, duration_ms)
SELECT r.message_id, r.event, r.transport, r.attempt, r.recipient, r.smtp_code, r.enhanced_code,
       r.provider_code, r.response, r.provider_message_id, r.duration_ms
FROM jsonb_to_recordset($1) AS r(message_id bigint, event text, transport text, attempt int, recipient text,
                                 smtp_code int, enhanced_code text, provider_code text, response text,
                                 provider_message_id text, duration_ms float8)
