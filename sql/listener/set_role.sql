-- The role an API request runs as ('none': back to the listener's own), until the transaction
-- ends or this subtransaction is rolled back.
SELECT pg_catalog.set_config('role', $1, true)
