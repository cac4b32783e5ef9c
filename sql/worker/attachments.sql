-- The attachments of the claimed messages $1, in order.
SELECT message_id, filename, content_type, content_id, content
FROM email.attachments
WHERE message_id = ANY ($1)
ORDER BY message_id, position
