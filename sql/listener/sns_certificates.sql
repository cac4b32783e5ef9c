-- SNS signing certificates fetched earlier, by URL.
SELECT url, pem FROM email.sns_certificates
