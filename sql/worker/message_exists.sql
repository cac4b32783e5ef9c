-- Whether message $1 is still in the outbox (it may be deleted while it is being sent).
SELECT EXISTS (SELECT 1 FROM email.messages WHERE id = $1)
