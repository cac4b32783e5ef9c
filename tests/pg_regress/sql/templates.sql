-- Stored templates: save-time errors with part, line and column; email.render, the preview of
-- what the worker would send, with layouts, partials and escaping; render errors.
\pset null '(null)'
\pset format unaligned
\pset tuples_only on
SELECT refused($$INSERT INTO email.templates (name, subject, body) VALUES ('bad', 'Hi', E'line one\nHello {{ name }')$$);
SELECT refused($$INSERT INTO email.templates (name, subject, body, html) VALUES ('bad', 'Hi', 'x', '<p>{% if %}</p>')$$);
SELECT refused($$INSERT INTO email.templates (name, subject, body) VALUES ('bad', '{{ name ', 'x')$$);
\pset format aligned
\pset tuples_only off
INSERT INTO email.templates (name, subject, body, html) VALUES
    ('base', '[Shop] {% block s %}{% endblock %}',
     E'{% block b %}{% endblock %}\n-- {% include "footer" %}',
     '<html><body>{% block b %}{% endblock %}{% include "footer" %}</body></html>'),
    ('footer', 'unused', 'The Shop', '<footer>The Shop</footer>');
INSERT INTO email.templates (name, subject, body, html) VALUES ('order',
    '{% extends "base" %}{% block s %}Order {{ order.id }}{% endblock %}',
    '{% extends "base" %}{% block b %}Hi {{ name }}, {% for i in order.items %}{{ i }};{% endfor %}{% endblock %}',
    '{% extends "base" %}{% block b %}<p>Hi {{ name }}</p>{% endblock %}');
SELECT * FROM email.render('order', '{"name": "<script>alert(1)</script>", "order": {"id": 42, "items": ["a", "b"]}}');
INSERT INTO email.templates (name, subject, html) VALUES ('html_only', 'Hi',
    '<h1>Welcome</h1><p>Read <a href="https://shop.test/terms">the terms</a>.</p>');
SELECT * FROM email.render('html_only');
INSERT INTO email.templates (name, subject, body) VALUES ('soft', 'Hi {{ name | default("friend") }}',
    '{% if coupon is defined %}{{ coupon }}{% else %}no coupon{% endif %}');
SELECT * FROM email.render('soft');
-- every change is a new version
UPDATE email.templates SET body = 'Hello again {{ name }}' WHERE name = 'soft';
SELECT name, version FROM email.template_versions WHERE name = 'soft' ORDER BY version;
-- render errors
\pset format unaligned
\pset tuples_only on
SELECT refused($$SELECT * FROM email.render('nope')$$);
SELECT refused($$SELECT * FROM email.render('order', '{}')$$);
INSERT INTO email.templates (name, subject, body) VALUES ('subj', 'Hi {{ name }}', 'x');
SELECT refused($$SELECT * FROM email.render('subj', '{"name": "x\r\nBcc: evil@z.test"}')$$);
INSERT INTO email.templates (name, subject, body) VALUES ('loop', 'x', '{% for i in range(1000000000) %}{{ i }}{% endfor %}');
SELECT refused($$SELECT * FROM email.render('loop')$$);
-- a layout still used cannot be deleted
SELECT refused($$DELETE FROM email.templates WHERE name = 'footer'$$);
