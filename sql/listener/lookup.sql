-- The one recipient of message $1 and its topic (for the unsubscribe page); no row when it is
-- gone or has several recipients.
SELECT email._address(coalesce(recipients[1], cc[1], bcc[1])) AS address, topic
FROM email.messages
WHERE id = $1
  AND cardinality(recipients) + coalesce(cardinality(cc), 0) + coalesce(cardinality(bcc), 0) = 1
