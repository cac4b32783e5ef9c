"""Postmark: POST /email, X-Postmark-Server-Token, a JSON message (mirrors
src/deliver/providers/postmark.rs). pg_email sends one message per call, so the batch endpoint is
not implemented: /email/batch is answered 404 like any other unknown path."""
import datetime
import uuid

from .common import (ID_KEY, Provider, Reply, b64, echoed_id, has_crlf, is_name_value, load_json, mailbox,
    mailbox_list, mime_type, reason, retry_headers)


class Postmark(Provider):
    PATH = "/email"
    KEYS = {
        "From", "To", "Cc", "Bcc", "Subject", "Tag", "HtmlBody", "TextBody", "ReplyTo", "Headers",
        "TrackOpens", "TrackLinks", "Attachments", "Metadata", "MessageStream", "InlineCss",
    }

    @staticmethod
    def err(status, code, message, headers=None):
        return Reply(status, {"ErrorCode": code, "Message": message}, headers)

    def bad(self, message):
        return self.err(422, 300, message)

    def validate(self, rec):
        if rec["path"] != self.PATH:
            raise self.err(404, 0, "Not found.")
        if rec["method"] != "POST":
            raise self.err(405, 0, "Method not allowed.")
        if rec["headers"].get("x-postmark-server-token") != self.fake.key:
            raise self.err(401, 10, "Request does not contain a valid Server token.")
        if "application/json" not in rec["headers"].get("accept", "").lower():
            raise self.bad("The 'Accept' header must be 'application/json'.")
        ok, body = load_json(rec)
        if mime_type(rec["headers"]) != "application/json":
            raise self.bad("The 'Content-Type' header must be 'application/json'.")
        if not ok:
            raise self.err(422, 402, "Received invalid JSON input.")
        recipients = self.validate_message(body)
        rec["pg_email_id"] = echoed_id((body.get("Metadata") or {}).get(ID_KEY))
        return recipients

    def validate_message(self, m):
        if not isinstance(m, dict):
            raise self.bad("The message must be a JSON object.")
        for k in m:
            if k not in self.KEYS:
                raise self.bad(f"Unknown field '{k}'.")
        frm = m.get("From")
        if not isinstance(frm, str) or not frm.strip():
            raise self.bad("Invalid 'From' address: ''.")
        if mailbox(frm) is None:
            raise self.bad(f"Invalid 'From' address: '{frm}'.")
        recipients = []
        for field in ("To", "Cc", "Bcc"):
            v = m.get(field)
            if v is None or v == "":
                continue
            addrs, badpart = mailbox_list(v)
            if addrs is None:
                raise self.bad(f"Invalid '{field}' address: '{badpart}'.")
            recipients += [(a, field) for a in addrs]
        if not m.get("To"):
            raise self.bad("Zero recipients specified")
        if len(recipients) > 50:
            raise self.bad("Maximum of 50 recipients exceeded: 'To', 'Cc' and 'Bcc' may hold at most "
                           f"50 recipients in total, you supplied {len(recipients)}.")
        for field in ("Subject", "HtmlBody", "TextBody", "Tag", "MessageStream", "TrackLinks"):
            if field in m and m[field] is not None and not isinstance(m[field], str):
                raise self.bad(f"The '{field}' field must be a string.")
        if has_crlf(m.get("Subject")):
            raise self.bad("The 'Subject' may not contain line breaks.")
        if not m.get("HtmlBody") and not m.get("TextBody"):
            raise self.bad("Provide either email TextBody or HtmlBody or both.")
        if m.get("Tag") is not None and len(m["Tag"]) > 1000:
            raise self.bad("The 'Tag' may hold at most 1000 characters.")
        if m.get("TrackLinks") not in (None, "None", "HtmlAndText", "HtmlOnly", "TextOnly"):
            raise self.bad("Invalid 'TrackLinks' value.")
        if m.get("TrackOpens") is not None and not isinstance(m["TrackOpens"], bool):
            raise self.bad("The 'TrackOpens' field must be a boolean.")
        if m.get("MessageStream") is not None and not m["MessageStream"]:
            raise self.bad("The 'MessageStream' may not be empty.")
        rt = m.get("ReplyTo")
        if rt is not None and rt != "":
            if mailbox_list(rt)[0] is None:
                raise self.bad(f"Invalid 'ReplyTo' address: '{rt}'.")
        hs = m.get("Headers")
        if hs is not None:
            if not isinstance(hs, list):
                raise self.bad("The 'Headers' field must be an array of {Name, Value} objects.")
            if not all(is_name_value(h) for h in hs):
                raise self.bad("Each header must be an object {Name, Value} of strings.")
        atts = m.get("Attachments")
        if atts is not None:
            if not isinstance(atts, list):
                raise self.bad("The 'Attachments' field must be an array.")
            for a in atts:
                if not isinstance(a, dict) or set(a) - {"Name", "Content", "ContentType", "ContentID"}:
                    raise self.bad("Each attachment must be an object {Name, Content, ContentType, "
                                   "ContentID}.")
                if not isinstance(a.get("Name"), str) or not a["Name"]:
                    raise self.bad("Attachment 'Name' is required.")
                if not isinstance(a.get("ContentType"), str) or not a["ContentType"]:
                    raise self.bad(f"Attachment 'ContentType' is required ({a['Name']}).")
                if b64(a.get("Content")) is None:
                    raise self.bad(f"Attachment 'Content' must be base64 encoded ({a['Name']}).")
                if "ContentID" in a and a["ContentID"] is not None and not isinstance(a["ContentID"], str):
                    raise self.bad("Attachment 'ContentID' must be a string.")
        md = m.get("Metadata")
        if md is not None:
            if not isinstance(md, dict) or len(md) > 10:
                raise self.bad("'Metadata' must be an object of at most 10 fields.")
            for k, v in md.items():
                if not k or len(k) > 20 or not isinstance(v, str) or len(v) > 80:
                    raise self.bad("Metadata keys may hold at most 20 characters and values must be "
                                   "strings of at most 80 characters.")
        return recipients

    def fail(self, status, retry_after):
        h = retry_headers(retry_after)
        if status == 401:
            return self.err(401, 10, "Request does not contain a valid Server token.", h)
        if status == 422:
            return self.err(422, 300, "Invalid request", h)
        msgs = {429: "Rate limit exceeded. Please retry later.", 500: "Internal server error.",
                503: "Service unavailable. Please retry later."}
        return self.err(status, 0, msgs.get(status, reason(status) + "."), h)

    def reject(self, rec, address, locator):
        return Reply(422, {"ErrorCode": 406, "Message": "You tried to send to recipient(s) that have been "
                           f"marked as inactive. Found inactive addresses: {address}. Inactive recipients "
                           "are ones that have generated a hard bounce, a spam complaint, or a manual "
                           "suppression."})

    def success(self, rec):
        body = {"To": rec["json"].get("To"),
                "SubmittedAt": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "MessageID": str(uuid.uuid4()), "ErrorCode": 0, "Message": "OK"}
        rec["message_id"] = body["MessageID"]
        return Reply(200, body, accepted=True)
