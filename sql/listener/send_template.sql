-- One template message of the HTTP send API (Postmark's /email/withTemplate), as the key's role.
SELECT email.send_template(recipients => $1, sender => $2, cc => $3, bcc => $4, reply_to => $5, headers => $6,
                           attachments => $7, tags => $8, metadata => $9, send_at => $10::timestamptz,
                           idempotency_key => $11, track_opens => $12, track_clicks => $13, topic => $14,
                           template => $15, data => coalesce($16, '{}'::jsonb))
