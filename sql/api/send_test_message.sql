-- The test message email.test_transport queues: to $1, subject $2, through transport $3.
SELECT email.send(recipients => $1, subject => $2, transport => $3,
                  body => 'This is a test message from pg_email. Its receipts in email.receipts say how it went.')
