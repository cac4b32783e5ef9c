-- A kept SNS signing certificate by URL $1 (fetched earlier by the listener).
SELECT pem FROM email.sns_certificates WHERE url = $1
