-- Run by tests/e2e/test_golden.py in each fresh database, after CREATE EXTENSION pg_email and
-- before the case itself; its output is not compared.

-- refused(statement): runs the statement and returns how it was refused, as a client sees it:
-- "SQLSTATE: message", then the DETAIL and HINT lines if any. A statement that is not refused
-- returns 'not refused' (and its effect stays).
CREATE FUNCTION public.refused(statement text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    detail text;
    hint text;
BEGIN
    EXECUTE statement;
    RETURN 'not refused';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
    RETURN SQLSTATE || ': ' || SQLERRM
        || coalesce(E'\nDETAIL: ' || nullif(detail, ''), '')
        || coalesce(E'\nHINT: ' || nullif(hint, ''), '');
END $$;
