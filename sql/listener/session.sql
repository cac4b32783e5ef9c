-- Session settings of the listener worker. While its main thread is in a transaction no HTTP
-- bytes move, so nothing may wait long: a blocked lock or a slow statement fails the batch,
-- whose webhooks are answered 503 (the provider retries), well within their timeouts.
SET lock_timeout = '4s';
SET statement_timeout = '8s';
SET jit = off;
SET application_name = 'pg_email listener';
