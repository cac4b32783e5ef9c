-- Stores one received message ($1: the parsed row, $2: the raw bytes); returns its email.inbound id.
SELECT email._record_inbound($1, $2)
