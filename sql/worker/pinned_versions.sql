-- The template versions pinned by the claimed messages: pairs of name ($1) and version ($2).
SELECT v.name, v.version, v.subject, v.body, v.html
FROM email.template_versions v
JOIN unnest($1::text[], $2::int[]) AS w(name, version) USING (name, version)
