-- email.send and email.send_template refuse bad input in the caller's statement, with the
-- SQLSTATE and a message that names the field (refused() is defined in ../setup.sql).
\pset format unaligned
\pset tuples_only on
SELECT email.add_transport('cap', 'capture://', is_default => true);
-- addresses
SELECT refused($$SELECT email.send(recipients => 'not-an-address', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => '', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => NULL, subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org,', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org b@y.org', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'Bo <b@y.org', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => E'a@x.org\nBcc: evil@z.org', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', cc => 'bad@', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', bcc => '@bad', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', reply_to => 'nope', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', sender => 'x@y.org, z@y.org', subject => 's', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', sender => 'broken', subject => 's', body => 'b')$$);
-- subject and body
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => E'hi\r\nBcc: evil@z.org', body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => NULL, body => 'b')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's')$$);
-- headers
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{"Subject": "x"}')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{"Message-ID": "x"}')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{"X Bad": "x"}')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{"X-A": "a\r\nBcc: e@z.org"}')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{"X-A": 1}')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '[1]')$$);
-- attachments
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => '{}')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => '[{"content": "aGk="}]')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => '[{"filename": "a", "content": "%%%"}]')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => '[{"filename": "a", "content": "aGk=", "content_type": "nonsense"}]')$$);
-- the rest
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', tags => ARRAY[''])$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', metadata => '[1]')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', idempotency_key => '')$$);
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', transport => 'nope')$$);
SET pg_email.max_recipients = 2;
SELECT refused($$SELECT email.send(recipients => 'a@x.org, b@x.org', cc => 'c@x.org', subject => 's', body => 'b')$$);
RESET pg_email.max_recipients;
SET pg_email.max_message_size = '1kB';
SELECT refused($$SELECT email.send(recipients => 'a@x.org', subject => 's', body => repeat('b', 2000))$$);
RESET pg_email.max_message_size;
-- send_template
INSERT INTO email.templates (name, subject, body) VALUES ('hello', 'Hi {{ name }}', 'Hello {{ name }}');
SELECT refused($$SELECT email.send_template(template => 'nope', recipients => 'a@x.org')$$);
SELECT refused($$SELECT email.send_template(template => NULL, recipients => 'a@x.org')$$);
SELECT refused($$SELECT email.send_template(template => 'hello', recipients => 'a@x.org')$$);
SELECT refused($$SELECT email.send_template(template => 'hello', recipients => 'a@x.org', data => '{"name": "x\r\nBcc: e@z.org"}')$$);
SELECT refused($$SELECT email.send_template(template => 'hello', recipients => 'bad', data => '{"name": "Ann"}')$$);
-- nothing was queued by any of these
SELECT count(*) AS queued FROM email.messages;
