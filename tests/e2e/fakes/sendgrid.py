"""SendGrid v3 Mail Send: POST /v3/mail/send, Bearer key, a JSON body of personalizations
(mirrors src/deliver/providers/sendgrid.rs)."""
import json
import secrets
import time

from .common import (ID_KEY, Provider, Reply, b64, echoed_id, has_crlf, is_email, load_json, mime_type,
    reason, retry_headers, retry_seconds)


class SendGrid(Provider):
    PATH = "/v3/mail/send"
    RESERVED_HEADERS = {
        "from", "to", "subject", "reply-to", "cc", "bcc", "content-type", "dkim-signature",
        "content-transfer-encoding", "x-sg-id", "x-sg-eid", "received",
    }
    TOP_KEYS = {
        "personalizations", "from", "reply_to", "reply_to_list", "subject", "content",
        "attachments", "template_id", "headers", "categories", "custom_args", "send_at",
        "batch_id", "asm", "ip_pool_name", "mail_settings", "tracking_settings",
    }
    P_KEYS = {
        "to", "cc", "bcc", "from", "subject", "headers", "substitutions",
        "dynamic_template_data", "custom_args", "send_at",
    }
    MAX_BODY = 30 * 1024 * 1024

    @staticmethod
    def err(status, message, field=None, headers=None):
        return Reply(status, {"errors": [{"message": message, "field": field, "help": None}]}, headers)

    def validate(self, rec):
        if rec["path"] != self.PATH:
            raise self.err(404, "not found")
        if rec["method"] != "POST":
            raise self.err(405, "method not allowed")
        scheme, _, token = rec["headers"].get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.fake.key:
            raise self.err(401, "The provided authorization grant is invalid, expired, or revoked")
        if len(rec["body"]) > self.MAX_BODY:
            raise self.err(413, "The JSON payload you have included in your request is too large.")
        ok, body = load_json(rec)
        if mime_type(rec["headers"]) != "application/json":
            raise self.err(400, "Content-Type should be application/json.")
        if not ok or not isinstance(body, dict):
            raise self.err(400, "Bad Request")
        recipients = self.validate_body(body)
        # pg_email's message id: the message's custom_args, overridden by the first
        # personalization's (SendGrid merges them that way)
        args = dict(body.get("custom_args") or {})
        args.update(body["personalizations"][0].get("custom_args") or {})
        rec["pg_email_id"] = echoed_id(args.get(ID_KEY))
        return recipients

    def email_obj(self, obj, field, what="email"):
        if not isinstance(obj, dict):
            raise self.err(400, f"The {what} must be an object with an email and an optional name.", field)
        for k in obj:
            if k not in ("email", "name"):
                raise self.err(400, f"Unknown field `{k}`.", f"{field}.{k}")
        if not is_email(obj.get("email")):
            raise self.err(400, "Does not contain a valid address.", f"{field}.email")
        name = obj.get("name")
        if name is not None and (not isinstance(name, str) or has_crlf(name)):
            raise self.err(400, "The name must be a string without line breaks.", f"{field}.name")
        return obj["email"]

    def headers_obj(self, h, field):
        if not isinstance(h, dict):
            raise self.err(400, "The headers must be an object of string values.", field)
        for name, value in h.items():
            if not isinstance(value, str) or has_crlf(value) or has_crlf(name) or not name:
                raise self.err(400, "Header values must be strings.", f"{field}.{name}")
            if name.lower() in self.RESERVED_HEADERS:
                raise self.err(400, f"The header {name} is reserved and may not be set in headers.",
                               f"{field}.{name}")

    def custom_args(self, ca, field):
        if not isinstance(ca, dict) or not all(isinstance(v, str) for v in ca.values()):
            raise self.err(400, "The custom_args must be an object of string values.", field)
        if len(json.dumps(ca).encode()) > 10000:
            raise self.err(400, "The custom_args may not exceed 10,000 bytes.", field)

    def validate_body(self, b):
        for k in b:
            if k not in self.TOP_KEYS:
                raise self.err(400, f"Unknown field `{k}`.", k)
        ps = b.get("personalizations")
        if not isinstance(ps, list) or not 1 <= len(ps) <= 1000:
            raise self.err(400, "The personalizations field is required and must have at least one "
                                "personalization and no more than 1000.", "personalizations")
        self.email_obj(b.get("from"), "from", "from")
        if "reply_to" in b and "reply_to_list" in b:
            raise self.err(400, "reply_to and reply_to_list are mutually exclusive.", "reply_to")
        if "reply_to" in b:
            self.email_obj(b["reply_to"], "reply_to", "reply_to")
        if "reply_to_list" in b:
            if not isinstance(b["reply_to_list"], list) or not b["reply_to_list"]:
                raise self.err(400, "The reply_to_list must be a non-empty array.", "reply_to_list")
            for i, r in enumerate(b["reply_to_list"]):
                self.email_obj(r, f"reply_to_list.{i}", "reply_to")
        top_subject = b.get("subject")
        if top_subject is not None and not isinstance(top_subject, str):
            raise self.err(400, "The subject must be a string.", "subject")
        templated = "template_id" in b
        recipients = []
        for pi, p in enumerate(ps):
            pf = f"personalizations.{pi}"
            if not isinstance(p, dict):
                raise self.err(400, "Each personalization must be an object.", pf)
            for k in p:
                if k not in self.P_KEYS:
                    raise self.err(400, f"Unknown field `{k}`.", f"{pf}.{k}")
            seen = set()
            for kind in ("to", "cc", "bcc"):
                lst = p.get(kind)
                if lst is None:
                    if kind == "to":
                        raise self.err(400, "The to array is required for all personalization objects, "
                                            "and must have at least one email object with a valid email "
                                            "address.", f"{pf}.to")
                    continue
                if not isinstance(lst, list) or (kind == "to" and not lst):
                    raise self.err(400, f"The {kind} field must be an array of email objects"
                                        + (" with at least one element." if kind == "to" else "."),
                                   f"{pf}.{kind}")
                for i, r in enumerate(lst):
                    f = f"{pf}.{kind}.{i}"
                    addr = self.email_obj(r, f)
                    if addr.lower() in seen:
                        raise self.err(400, "Each email address in the personalization block should be "
                                            "unique between to, cc, and bcc. We found the first duplicate "
                                            f"instance of [{addr}] in the personalizations.{pi}.{kind} field.",
                                       f"{f}.email")
                    seen.add(addr.lower())
                    recipients.append((addr, f"{f}.email"))
            if "from" in p:
                self.email_obj(p["from"], f"{pf}.from", "from")
            if "subject" in p and not isinstance(p["subject"], str):
                raise self.err(400, "The subject must be a string.", f"{pf}.subject")
            if not templated and not top_subject and not p.get("subject"):
                raise self.err(400, "The subject is required. You can get around this requirement if you "
                                    "use a template with a subject defined or if every personalization "
                                    "has a subject defined.", "subject")
            if "headers" in p:
                self.headers_obj(p["headers"], f"{pf}.headers")
            if "custom_args" in p:
                self.custom_args(p["custom_args"], f"{pf}.custom_args")
            if "send_at" in p and (type(p["send_at"]) is not int):
                raise self.err(400, "The send_at must be a unix timestamp (integer).", f"{pf}.send_at")
        if len(recipients) > 1000:
            raise self.err(400, "The total number of recipients in all personalizations may not exceed "
                                "1000.", "personalizations")
        content = b.get("content")
        if content is None and not templated:
            raise self.err(400, "Unless a valid template_id is provided, the content parameter is "
                                "required. There must be at least one defined content block. We "
                                "typically suggest both text/plain and text/html blocks are included, "
                                "but only one block is required.", "content")
        if content is not None:
            if not isinstance(content, list) or not content:
                raise self.err(400, "The content must be an array with at least one content block.",
                               "content")
            types = []
            for i, c in enumerate(content):
                f = f"content.{i}"
                if not isinstance(c, dict) or set(c) - {"type", "value"}:
                    raise self.err(400, "Each content block must be an object with type and value.", f)
                if not isinstance(c.get("type"), str) or not c["type"] or has_crlf(c["type"]):
                    raise self.err(400, "The content type must be a string at least one character in "
                                        "length.", f"{f}.type")
                if not isinstance(c.get("value"), str) or not c["value"]:
                    raise self.err(400, "The content value must be a string at least one character in "
                                        "length.", f"{f}.value")
                types.append(c["type"].split(";")[0].strip().lower())
            if len(set(types)) != len(types):
                raise self.err(400, "Each content type may appear only once.", "content")
            if "text/plain" in types and types.index("text/plain") != 0:
                raise self.err(400, "If present, text/plain must be first, followed by text/html, "
                                    "followed by any other content.", "content")
            if "text/html" in types and types.index("text/html") != (1 if "text/plain" in types else 0):
                raise self.err(400, "If present, text/plain must be first, followed by text/html, "
                                    "followed by any other content.", "content")
        atts = b.get("attachments")
        if atts is not None:
            if not isinstance(atts, list):
                raise self.err(400, "The attachments must be an array.", "attachments")
            for i, a in enumerate(atts):
                f = f"attachments.{i}"
                if not isinstance(a, dict):
                    raise self.err(400, "Each attachment must be an object.", f)
                for k in a:
                    if k not in ("content", "type", "filename", "disposition", "content_id"):
                        raise self.err(400, f"Unknown field `{k}`.", f"{f}.{k}")
                if not a.get("content") or b64(a["content"]) is None:
                    raise self.err(400, "The attachment content must be base64 encoded.", f"{f}.content")
                if not isinstance(a.get("filename"), str) or not a["filename"] or has_crlf(a["filename"]):
                    raise self.err(400, "The attachment filename parameter is required.", f"{f}.filename")
                if "type" in a and (not isinstance(a["type"], str) or not a["type"] or has_crlf(a["type"])):
                    raise self.err(400, "The attachment type must be a string.", f"{f}.type")
                disp = a.get("disposition", "attachment")
                if disp not in ("attachment", "inline"):
                    raise self.err(400, "The disposition of your attachment can be either 'inline' or "
                                        "'attachment'.", f"{f}.disposition")
                if disp == "inline" and (not isinstance(a.get("content_id"), str) or not a["content_id"]):
                    raise self.err(400, "The content_id parameter is required if your attachment has a "
                                        "disposition of 'inline'.", f"{f}.content_id")
                if "content_id" in a and not isinstance(a["content_id"], str):
                    raise self.err(400, "The content_id must be a string.", f"{f}.content_id")
        cats = b.get("categories")
        if cats is not None:
            if not isinstance(cats, list) or len(cats) > 10:
                raise self.err(400, "You may not have more than 10 categories per request.", "categories")
            for i, c in enumerate(cats):
                if not isinstance(c, str) or not c or len(c) > 255:
                    raise self.err(400, "Each category must be a string of 1 to 255 characters.",
                                   f"categories.{i}")
        if "custom_args" in b:
            self.custom_args(b["custom_args"], "custom_args")
        if "headers" in b:
            self.headers_obj(b["headers"], "headers")
        if "send_at" in b and type(b["send_at"]) is not int:
            raise self.err(400, "The send_at must be a unix timestamp (integer).", "send_at")
        if "mail_settings" in b and not isinstance(b["mail_settings"], dict):
            raise self.err(400, "The mail_settings must be an object.", "mail_settings")
        return recipients

    def fail(self, status, retry_after):
        msgs = {
            400: "Bad Request", 401: "The provided authorization grant is invalid, expired, or revoked",
            403: "access forbidden", 404: "not found", 413: "The JSON payload you have included in "
            "your request is too large.", 429: "too many requests", 500: "internal server error",
            503: "service unavailable",
        }
        headers = retry_headers(retry_after)
        if status == 429:
            headers.update({
                "X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(time.time()) + max(1, retry_seconds(retry_after))),
            })
        return self.err(status, msgs.get(status, reason(status).lower()), None, headers)

    def reject(self, rec, address, locator):
        return self.err(400, "Does not contain a valid address.", locator)

    def success(self, rec):
        sandbox = False
        ms = rec["json"].get("mail_settings") or {}
        if isinstance(ms.get("sandbox_mode"), dict) and ms["sandbox_mode"].get("enable") is True:
            sandbox = True
        mid = secrets.token_urlsafe(16)[:22]
        rec["message_id"] = mid
        return Reply(200 if sandbox else 202, b"", {"X-Message-Id": mid}, accepted=True)
