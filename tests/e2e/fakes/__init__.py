"""Local fake servers for the five provider HTTP APIs that pg_email sends mail through.

    Fake(provider, port, *, key=..., domain=..., access_key=..., secret_key=..., region=...)

provider is one of "sendgrid", "postmark", "resend", "mailgun", "ses". Every fake listens on
127.0.0.1:port (plain HTTP) in a background thread of this process and implements the send call
described in PROVIDERS.md (../shared/PROVIDERS.md, beside the repository), ENFORCING the documented
request shape: the URL path, the authentication (for SES a real AWS Signature Version 4, verified
independently with botocore), the content type and the body. A request that the real service
would refuse is refused here with the provider's own status, headers and error body; a request it
would accept is answered with the provider's own success response and recorded in `accepted`.

    fake.requests        every request received, valid or not, in order of arrival
    fake.accepted        only those answered with success
    fake.fail_next(status, n=1, retry_after=None)
                         the next n otherwise-valid requests get this status and the provider's
                         error body for it (plus Retry-After when given)
    fake.reject_address(address)
                         a valid request naming the address (to/cc/bcc, case-insensitive) gets the
                         provider's recipient-level rejection
    fake.wait_for(n, timeout=10.0)
                         waits until len(accepted) >= n; returns accepted, raises AssertionError
    fake.set_down(True)  every connection is closed at once without a response
    fake.url / fake.endpoint / fake.reset() / fake.clear_rejections()

Each recorded request is a dict:

    method, path, query ({name: [values]}), headers ({lower-case name: value}), body (bytes),
    json (parsed JSON or None), form ({field: [str values]} or None, Mailgun),
    files ([{field, filename, content_type, content}], Mailgun), mime (email.message.EmailMessage
    for SES Raw content, else None), pg_email_id (int or None, below), status (int answered),
    response (dict/list answered as JSON, or bytes), response_headers (dict), at (time.monotonic()
    on arrival)

pg_email_id is the message id pg_email sends as custom data under the key pg_email_id (SendGrid
custom_args, Postmark Metadata, Mailgun v:pg_email_id, Resend tags, SES EmailTags; read from a
request whose shape was accepted): an int, None when the request carries none.

And, where they apply: message_id (the id answered on success), rejected_address (reject_address
hit), idempotent_replay (Resend: same Idempotency-Key and body, answered with the first id and not
added to `accepted`), sigv4 (SES: canonical_request, string_to_sign, expected and given signature,
to debug a refusal), raw_query and _raw_headers (as received).

Order of checks: path and method, authentication, content type and body shape (all of these are
refused whatever was scripted), then Resend idempotency replay/conflict, then fail_next, then
reject_address, then success. A bug inside the fake is answered with status 599 and a text body.

Requests are appended to `requests` on arrival (status None until answered, which happens before
the response is written); a success is appended to `accepted` before its response is written.

Start/stop: start() returns self once the port listens; stop() is idempotent, closes kept-alive
connections and joins the thread; both are available through `with Fake(...) as fake:`
(live.Server). Fakes still running at interpreter exit are stopped (live.stop_all). Run under Debian's
/usr/bin/python3 (python3-botocore is needed for SES).

Layout, mirroring src/deliver/providers/: one module per provider (sendgrid, postmark, resend,
mailgun, ses), each a common.Provider that validates the request and builds the provider's
answers; common.py holds the shared Reply and parsing helpers; server.py the HTTP server and Fake.
Only the calls pg_email makes are implemented (e.g. not Postmark's /email/batch).
"""
from .server import PROVIDERS, Fake

__all__ = ["Fake", "PROVIDERS"]
