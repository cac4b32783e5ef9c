"""Resend: POST /emails, Bearer key, a JSON body, Idempotency-Key replay and conflict (mirrors
src/deliver/providers/resend.rs)."""
import json
import re
import uuid

from .common import (ID_KEY, Provider, Reply, b64, echoed_id, has_crlf, load_json, mailbox, mime_type,
    retry_headers, retry_seconds)


class Resend(Provider):
    PATH = "/emails"
    KEYS = {"from", "to", "subject", "cc", "bcc", "reply_to", "html", "text", "headers",
            "scheduled_at", "attachments", "tags"}
    TAG_RE = re.compile(r"^[A-Za-z0-9_-]+$")

    @staticmethod
    def err(status, name, message, headers=None):
        return Reply(status, {"statusCode": status, "message": message, "name": name}, headers)

    def bad(self, message):
        return self.err(422, "validation_error", message)

    def addr_field(self, v, field, limit=None):
        vals = [v] if isinstance(v, str) else v
        if not isinstance(vals, list) or not vals or not all(isinstance(x, str) for x in vals):
            raise self.bad(f"Invalid `{field}` field. It must be a string or an array of strings.")
        if limit is not None and len(vals) > limit:
            raise self.bad(f"Invalid `{field}` field. It may contain at most {limit} addresses.")
        out = []
        for x in vals:
            a = mailbox(x)
            if a is None:
                raise self.bad(f"Invalid `{field}` field. The email address needs to follow the "
                               "`email@example.com` or `Name <email@example.com>` format.")
            out.append(a)
        return out

    def validate(self, rec):
        if rec["path"] != self.PATH:
            raise self.err(404, "not_found", "The requested endpoint does not exist.")
        if rec["method"] != "POST":
            raise self.err(405, "method_not_allowed", "Method is not allowed for the requested path.")
        auth = rec["headers"].get("authorization")
        scheme, _, token = (auth or "").partition(" ")
        if not auth or scheme.lower() != "bearer" or not token.strip():
            raise self.err(401, "missing_api_key", "Missing API key in the authorization header")
        if token.strip() != self.fake.key:
            raise self.err(403, "invalid_api_key", "API key is invalid")
        ik = rec["headers"].get("idempotency-key")
        if ik is not None and not 1 <= len(ik) <= 256:
            raise self.err(400, "invalid_idempotency_key", "The key must be between 1-256 chars.")
        ok, b = load_json(rec)
        if mime_type(rec["headers"]) != "application/json":
            raise self.bad("Invalid content type: the body must be sent as application/json.")
        if not ok or not isinstance(b, dict):
            raise self.bad("Invalid JSON body.")
        for k in b:
            if k not in self.KEYS:
                raise self.bad(f"Unknown field `{k}`.")
        for f in ("from", "to", "subject"):
            if b.get(f) is None:
                raise self.err(422, "missing_required_field", f"Missing `{f}` field.")
        if mailbox(b["from"]) is None:
            raise self.bad("Invalid `from` field. The email address needs to follow the "
                           "`email@example.com` or `Name <email@example.com>` format.")
        recipients = [(a, "to") for a in self.addr_field(b["to"], "to", 50)]
        for f in ("cc", "bcc"):
            if b.get(f) is not None:
                recipients += [(a, f) for a in self.addr_field(b[f], f)]
        if b.get("reply_to") is not None:
            self.addr_field(b["reply_to"], "reply_to")
        if not isinstance(b["subject"], str) or has_crlf(b["subject"]):
            raise self.bad("Invalid `subject` field. It must be a string without line breaks.")
        for f in ("html", "text", "scheduled_at"):
            if b.get(f) is not None and not isinstance(b[f], str):
                raise self.bad(f"Invalid `{f}` field. It must be a string.")
        if not b.get("html") and not b.get("text"):
            raise self.bad("Missing `html` or `text` field.")
        hs = b.get("headers")
        if hs is not None:
            if not isinstance(hs, dict) or not all(isinstance(v, str) and not has_crlf(v) and
                                                   k and not has_crlf(k) for k, v in hs.items()):
                raise self.bad("Invalid `headers` field. It must be an object of string values.")
        atts = b.get("attachments")
        if atts is not None:
            if not isinstance(atts, list):
                raise self.err(422, "invalid_attachment", "Attachments must be an array.")
            for a in atts:
                if not isinstance(a, dict) or set(a) - {"content", "path", "filename", "content_type",
                                                        "content_id"}:
                    raise self.err(422, "invalid_attachment", "Attachment must be an object with "
                                   "content or path, filename, content_type and content_id.")
                has_c, has_p = a.get("content") is not None, a.get("path") is not None
                if has_c == has_p:
                    raise self.err(422, "invalid_attachment",
                                   "Attachment must have either a `content` or `path`.")
                if has_c and b64(a["content"]) is None:
                    raise self.err(422, "invalid_attachment",
                                   "Attachment `content` must be base64 encoded.")
                if has_p and (not isinstance(a["path"], str) or not a["path"]):
                    raise self.err(422, "invalid_attachment", "Attachment `path` must be a URL.")
                fn = a.get("filename")
                if (has_c and not fn) or (fn is not None and (not isinstance(fn, str) or has_crlf(fn))):
                    raise self.err(422, "invalid_attachment", "Attachment `filename` is required.")
                for f in ("content_type", "content_id"):
                    if a.get(f) is not None and (not isinstance(a[f], str) or not a[f] or has_crlf(a[f])):
                        raise self.err(422, "invalid_attachment", f"Attachment `{f}` must be a string.")
        tags = b.get("tags")
        if tags is not None:
            if not isinstance(tags, list):
                raise self.bad("Invalid `tags` field. It must be an array of {name, value}.")
            for t in tags:
                if not isinstance(t, dict) or set(t) - {"name", "value"}:
                    raise self.bad("Invalid `tags` field. It must be an array of {name, value}.")
                name, value = t.get("name"), t.get("value")
                if not isinstance(name, str) or not self.TAG_RE.match(name) or len(name) > 256:
                    raise self.bad("Tags should only contain ASCII letters (a–z, A–Z), numbers (0–9), "
                                   "underscores (_), or dashes (-). It can contain no more than 256 "
                                   "characters.")
                if value is not None and (not isinstance(value, str) or
                                          (value and not self.TAG_RE.match(value)) or len(value) > 256):
                    raise self.bad("Tags should only contain ASCII letters (a–z, A–Z), numbers (0–9), "
                                   "underscores (_), or dashes (-). It can contain no more than 256 "
                                   "characters.")
        rec["pg_email_id"] = echoed_id(next((t.get("value") for t in tags or [] if t["name"] == ID_KEY), None))
        return recipients

    def idempotency(self, rec):
        """Under the fake's lock, before anything else is decided: a replay or a conflict."""
        ik = rec["headers"].get("idempotency-key")
        if ik is None:
            return None
        canon = json.dumps(rec["json"], sort_keys=True)
        seen = self.fake._idempotency.get(ik)
        if seen is None:
            return None
        if seen[0] != canon:
            return self.err(409, "invalid_idempotent_request", "Same idempotency key used with a "
                            "different request payload. Change your idempotency key or payload.")
        rec["idempotent_replay"] = True
        rec["message_id"] = seen[1]
        return Reply(200, {"id": seen[1]})

    def fail(self, status, retry_after):
        h = retry_headers(retry_after)
        if status == 429:
            h.update({"ratelimit-limit": "2", "ratelimit-remaining": "0",
                      "ratelimit-reset": str(max(1, retry_seconds(retry_after)))})
            if retry_after is not None:
                h["retry-after"] = h.pop("Retry-After")
            return self.err(429, "rate_limit_exceeded", "Too many requests", h)
        names = {400: ("validation_error", "Invalid request"),
                 401: ("missing_api_key", "Missing API key in the authorization header"),
                 403: ("invalid_api_key", "API key is invalid"),
                 404: ("not_found", "The requested endpoint does not exist."),
                 409: ("concurrent_idempotent_requests", "Same idempotency key used while original "
                       "request is still in progress."),
                 422: ("validation_error", "Invalid request")}
        name, msg = names.get(status, ("application_error", "An unexpected error occurred."))
        return self.err(status, name, msg, h)

    def reject(self, rec, address, locator):
        return Reply(422, {"statusCode": 422, "name": "validation_error",
                            "message": "Invalid `to` field. The email address needs to follow the "
                            "`email@example.com` or `Name <email@example.com>` format: " + address})

    def success(self, rec):
        mid = str(uuid.uuid4())
        rec["message_id"] = mid
        ik = rec["headers"].get("idempotency-key")
        if ik is not None:
            self.fake._idempotency[ik] = (json.dumps(rec["json"], sort_keys=True), mid)
        return Reply(200, {"id": mid}, accepted=True)
