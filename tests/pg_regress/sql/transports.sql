-- email.add_transport: bad calls name the field with the SQLSTATE and never repeat a secret;
-- email.transports shows every DSN with its secret replaced by ***.
\pset null '(null)'
\pset format unaligned
\pset tuples_only on
SELECT refused($$SELECT email.add_transport('t1', 'gopher://x')$$);
SELECT refused($$SELECT email.add_transport('t1', 'smtp://u:p@h:25?tls=maybe')$$);
SELECT refused($$SELECT email.add_transport('t1', 'smtp://u:p@h:25?colour=blue')$$);
SELECT refused($$SELECT email.add_transport('t1', 'mailgun+api://k@default')$$);
SELECT refused($$SELECT email.add_transport('bad name!', 'capture://')$$);
SELECT refused($$SELECT email.add_transport(NULL, 'capture://')$$);
SELECT refused($$SELECT email.add_transport('t1', NULL)$$);
SELECT refused($$SELECT email.add_transport('t1', 'capture://', fallback => 'missing')$$);
SELECT refused($$SELECT email.add_transport('t1', 'capture://', fallback => 't1')$$);
SELECT refused($$SELECT email.add_transport('t1', 'smtp://user:Sup3rS3cret@mail.x.org:587?tls=bogus')$$);
SELECT refused($$SELECT email.add_transport('t1', 'ftp://user:Sup3rS3cret@x')$$);
-- one transport of each kind, then the public view
SELECT email.add_transport('cap', 'capture://', is_default => true);
SELECT email.add_transport('files', 'file:///tmp');
SELECT email.add_transport('smtp', 'smtp://user:Sup3rS3cret@mail.x.org:587', fallback => 'cap');
SELECT email.add_transport('smtps', 'smtps://user:Sup3rS3cret@mail.x.org');
SELECT email.add_transport('shop', 'capture://?from=Shop%20%3Cshop%40x.org%3E');
SELECT email.add_transport('sendgrid', 'sendgrid+api://Sup3rS3cret@default');
SELECT email.add_transport('postmark', 'postmark+api://Sup3rS3cret@default?message_stream=outbound');
SELECT email.add_transport('resend', 'resend+api://Sup3rS3cret@default');
SELECT email.add_transport('mailgun', 'mailgun+api://Sup3rS3cret:mg.x.org@default');
SELECT email.add_transport('ses', 'ses+api://AKIAEXAMPLE:Sup3rS3cret@default?region=eu-west-1');
\pset format aligned
\pset tuples_only off
SELECT name, kind, dsn, is_default, fallback, sender FROM email.transports ORDER BY name;
SELECT count(*) AS rows_showing_the_secret FROM email.transports t WHERE t::text LIKE '%Sup3rS3cret%';
-- replacing a transport keeps one default
SELECT email.add_transport('smtp', 'smtp://user:Other@mail.x.org:2525', is_default => true) IS NOT NULL AS replaced;
SELECT name, dsn, is_default FROM email.transports WHERE is_default;
