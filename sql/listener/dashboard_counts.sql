-- PLACEHOLDER until email._engagement lands
SELECT ''::text AS label, 0::int8 AS sent, 0::int8 AS delivered, 0::int8 AS bounced, 0::int8 AS complained, 0::int8 AS opened, 0::int8 AS clicked WHERE $1 IS NULL
