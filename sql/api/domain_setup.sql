-- What email.domain_setup($1) needs: the domain's DKIM keys (selector, TXT value) and every
-- transport's kind and masked DSN, as JSON.
SELECT coalesce((SELECT jsonb_agg(jsonb_build_array(k.selector, k.dns_value) ORDER BY k.created_at, k.selector)
                 FROM email.dkim_keys k WHERE k.domain = $1), '[]') AS keys,
       coalesce((SELECT jsonb_agg(jsonb_build_array(t.kind, t.dsn) ORDER BY t.name) FROM email.transports t), '[]')
           AS transports
