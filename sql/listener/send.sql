-- One message of the HTTP send API or SMTP submission, as the key's role (send_at is text: a
-- bad time fails here with its own SQLSTATE).
SELECT email.send(recipients => $1, sender => $2, cc => $3, bcc => $4, reply_to => $5, headers => $6,
                  attachments => $7, tags => $8, metadata => $9, send_at => $10::timestamptz,
                  idempotency_key => $11, track_opens => $12, track_clicks => $13, topic => $14,
                  subject => $15, body => $16, html => $17)
