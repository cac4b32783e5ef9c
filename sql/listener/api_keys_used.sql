-- When API keys were last used (Unix seconds), noted every few seconds.
SELECT email._api_keys_used($1, ARRAY(SELECT pg_catalog.to_timestamp(t) FROM unnest($2::float8[]) AS t))
