-- Which of the ids $1 are rows of email.messages (on Citus, the INSERT trigger's statement end
-- asks this apart from writing the receipts: Citus cannot plan the one-statement form).
SELECT coalesce(array_agg(m.id), '{}') FROM email.messages m WHERE m.id = ANY ($1::bigint[])
