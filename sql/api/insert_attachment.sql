-- One decoded attachment ($6, bytea) of message $1 at position $2.
INSERT INTO email.attachments (message_id, position, filename, content_type, content_id, content)
VALUES ($1, $2, $3, $4, $5, $6)
