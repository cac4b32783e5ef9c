"""Mailgun: POST /v3/{domain}/messages, Basic api:key, a multipart/form-data body with file parts
for attachments (mirrors src/deliver/providers/mailgun.rs)."""
import base64
import binascii
import datetime
import email.message
import email.parser
import email.policy
import email.utils
import json
import re
import secrets
import urllib.parse

from .common import (ID_KEY, Provider, Reply, echoed_id, has_crlf, mailbox, mailbox_list, mime_type,
    reason, retry_headers)


def _parse_multipart(body, boundary):
    """multipart/form-data -> [(header Message, content bytes)]; ValueError when malformed."""
    delim = b"--" + boundary.encode("latin-1")
    if body.startswith(delim):
        i = len(delim)
    else:
        pos = body.find(b"\r\n" + delim)
        if pos < 0:
            raise ValueError("no boundary delimiter in the body")
        i = pos + 2 + len(delim)
    parts = []
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    while True:
        if body[i:i + 2] == b"--":
            return parts
        eol = body.find(b"\r\n", i)
        if eol < 0 or body[i:eol].strip(b" \t"):
            raise ValueError("malformed boundary line")
        start = eol + 2
        nxt = body.find(b"\r\n" + delim, start)
        if nxt < 0:
            raise ValueError("no closing boundary delimiter")
        part = body[start:nxt]
        if part.startswith(b"\r\n"):
            head, content = b"", part[2:]
        else:
            he = part.find(b"\r\n\r\n")
            if he < 0:
                raise ValueError("part without a header/body separator")
            head, content = part[:he + 2], part[he + 4:]
        headers = parser.parsestr(head.decode("utf-8", "replace"))
        cte = (headers.get("content-transfer-encoding") or "").strip().lower()
        if cte == "base64":
            content = base64.b64decode(content)
        elif cte == "quoted-printable":
            content = binascii.a2b_qp(content)
        parts.append((headers, content))
        i = nxt + 2 + len(delim)


class Mailgun(Provider):
    PATH_RE = re.compile(r"^/v3/([^/]+)/messages$")
    FIELDS = {"from", "to", "cc", "bcc", "subject", "text", "html", "amp-html", "attachment",
              "inline", "template", "recipient-variables"}
    OPTION_PREFIXES = ("o:", "h:", "v:", "t:")
    MAX_OPTION = 16 * 1024
    MAX_BODY = 25 * 1024 * 1024

    def path(self):
        return f"/v3/{self.fake.domain}/messages"

    @staticmethod
    def err(status, message, headers=None):
        return Reply(status, {"message": message}, headers)

    def validate(self, rec):
        m = self.PATH_RE.match(rec["path"])
        if not m:
            raise Reply(404, b"404 page not found\n", {"Content-Type": "text/plain; charset=utf-8"})
        if rec["method"] != "POST":
            raise self.err(405, "Method Not Allowed")
        auth = rec["headers"].get("authorization", "")
        scheme, _, cred = auth.partition(" ")
        try:
            user, _, pw = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            user = pw = None
        if scheme.lower() != "basic" or user != "api" or pw != self.fake.key:
            raise Reply(401, b"Forbidden", {"Content-Type": "text/plain; charset=utf-8"})
        domain = urllib.parse.unquote(m.group(1))
        if domain.lower() != self.fake.domain.lower():
            raise self.err(404, f"Domain not found: {domain}")
        if len(rec["body"]) > self.MAX_BODY:
            raise self.err(413, "Request entity too large: messages may not exceed 25 MB.")
        ctype = rec["headers"].get("content-type", "")
        if mime_type(rec["headers"]) != "multipart/form-data":
            raise self.err(400, "The body must be multipart/form-data (got "
                                f"{ctype or 'no Content-Type'}).")
        msg = email.message.Message()
        msg["Content-Type"] = ctype
        boundary = msg.get_param("boundary")
        if not boundary:
            raise self.err(400, "multipart/form-data without a boundary.")
        try:
            parts = _parse_multipart(rec["body"], boundary)
        except (ValueError, binascii.Error) as e:
            raise self.err(400, f"Malformed multipart/form-data body: {e}.")
        form, files = {}, []
        for headers, content in parts:
            if headers.get_content_disposition() != "form-data":
                raise self.err(400, "Every part must have Content-Disposition: form-data.")
            name = headers.get_param("name", header="content-disposition")
            if not name:
                raise self.err(400, "A form-data part without a name.")
            name = email.utils.collapse_rfc2231_value(name)
            filename = headers.get_filename()
            if filename is not None:
                files.append({"field": name, "filename": filename,
                              "content_type": headers.get_content_type() if headers.get("content-type")
                              else "application/octet-stream",
                              "content": content})
                continue
            charset = headers.get_content_charset() or "utf-8"
            try:
                value = content.decode(charset)
            except (LookupError, UnicodeDecodeError):
                raise self.err(400, f"Parameter '{name}' is not valid {charset} text.")
            form.setdefault(name, []).append(value)
        rec["form"], rec["files"] = form, files
        recipients = self.validate_form(form, files)
        # v: variables are JSON (pg_email sends its id as a number); the last value if repeated
        values = form.get("v:" + ID_KEY)
        if values:
            try:
                rec["pg_email_id"] = echoed_id(json.loads(values[-1]))
            except ValueError:
                rec["pg_email_id"] = values[-1]
        return recipients

    def validate_form(self, form, files):
        for name in form:
            if name in ("attachment", "inline"):
                raise self.err(400, f"'{name}' parameter must be a file part (with a filename).")
            if name not in self.FIELDS and not name.startswith(self.OPTION_PREFIXES):
                raise self.err(400, f"Unknown parameter '{name}'.")
        for f in files:
            if f["field"] not in ("attachment", "inline"):
                raise self.err(400, f"Unexpected file part '{f['field']}'.")
        if not form.get("from"):
            raise self.err(400, "'from' parameter is missing")
        if len(form["from"]) != 1 or mailbox(form["from"][0]) is None:
            raise self.err(400, "from parameter is not a valid address. please check documentation")
        if not form.get("to"):
            raise self.err(400, "'to' parameter is missing")
        recipients = []
        for field in ("to", "cc", "bcc"):
            for v in form.get(field, []):
                addrs, badpart = mailbox_list(v)
                if addrs is None:
                    raise self.err(400, f"{field} parameter is not a valid address. please check "
                                        f"documentation: {badpart}")
                recipients += [(a, field) for a in addrs]
        if len(recipients) > 1000:
            raise self.err(400, "Too many recipients: at most 1000 in to, cc and bcc together.")
        if not form.get("subject"):
            raise self.err(400, "'subject' parameter is missing")
        for field in ("subject", "text", "html", "template"):
            if len(form.get(field, [])) > 1:
                raise self.err(400, f"'{field}' parameter may be given only once.")
        if has_crlf(form["subject"][0]):
            raise self.err(400, "'subject' may not contain line breaks.")
        if not form.get("text") and not form.get("html") and not form.get("template"):
            raise self.err(400, "Need at least one of 'text', 'html' or 'template' parameters "
                                "specified")
        for name, values in form.items():
            if name.startswith(self.OPTION_PREFIXES):
                for v in values:
                    if len(v.encode("utf-8")) > self.MAX_OPTION:
                        raise self.err(400, f"'{name}' parameter value is too large: options, headers "
                                            "and variables may hold at most 16 KB.")
            if name.startswith("h:") and (len(name) == 2 or any(has_crlf(v) for v in values)):
                raise self.err(400, f"'{name}' is not a valid header.")
        if len(form.get("o:tag", [])) > 3:
            raise self.err(400, "Too many tags: a message may carry at most 3 'o:tag' values.")
        for v in form.get("o:testmode", []):
            if v.lower() not in ("yes", "no", "true", "false"):
                raise self.err(400, "'o:testmode' must be yes, no, true or false.")
        for v in form.get("o:deliverytime", []):
            try:
                email.utils.parsedate_to_datetime(v)
            except (TypeError, ValueError):
                raise self.err(400, "'o:deliverytime' must be an RFC 2822 date.")
        return recipients

    def fail(self, status, retry_after):
        h = retry_headers(retry_after)
        if status == 401:
            return Reply(401, b"Forbidden", dict(h, **{"Content-Type": "text/plain; charset=utf-8"}))
        msgs = {400: "Bad request", 403: "Forbidden", 404: "Not found",
                413: "Request entity too large", 429: "Too many requests, please retry later",
                500: "Internal server error", 503: "Service unavailable"}
        return self.err(status, msgs.get(status, reason(status)), h)

    def reject(self, rec, address, locator):
        return self.err(400, "to parameter is not a valid address. please check documentation: "
                        + address)

    def success(self, rec):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S")
        mid = f"<{stamp}.{secrets.token_hex(8)}@{self.fake.domain}>"
        rec["message_id"] = mid
        return Reply(200, {"id": mid, "message": "Queued. Thank you."}, accepted=True)
