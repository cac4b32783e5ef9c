-- Keeps what the capture:// transport "sent" ($1: jsonb array; raw is base64).
INSERT INTO email.captured (message_id, transport, envelope_from, envelope_to, raw)
SELECT c.message_id, c.transport, c.envelope_from, c.envelope_to, decode(c.raw, 'base64')
FROM jsonb_to_recordset($1) AS c(message_id bigint, transport text, envelope_from text, envelope_to text[], raw text)
