-- Every current template, for rendering with layouts (extends) and partials (include).
SELECT name, subject, body, html FROM email.templates
