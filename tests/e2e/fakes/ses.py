"""Amazon SES v2: POST /v2/email/outbound-emails, an AWS Signature Version 4 verified
independently with botocore, Simple or Raw content (mirrors src/deliver/providers/ses.rs)."""
import datetime
import email.parser
import email.policy
import email.utils
import hashlib
import hmac
import re
import secrets
import urllib.parse
import uuid

from .common import (ID_KEY, Provider, Reply, b64, echoed_id, has_crlf, is_name_value, load_json, mailbox,
    mime_type, reason, retry_headers, split_list)


class SES(Provider):
    PATH = "/v2/email/outbound-emails"
    KEYS = {"FromEmailAddress", "FromEmailAddressIdentityArn", "Destination", "ReplyToAddresses",
            "FeedbackForwardingEmailAddress", "FeedbackForwardingEmailAddressIdentityArn",
            "Content", "EmailTags", "ConfigurationSetName", "ListManagementOptions", "EndpointId"}
    TAG_RE = re.compile(r"^[A-Za-z0-9_-]*$")
    SIG_MISMATCH = "The request signature we calculated does not match the signature you provided."

    @staticmethod
    def err(status, etype, message, headers=None):
        h = {"x-amzn-ErrorType": etype, "x-amzn-RequestId": str(uuid.uuid4())}
        h.update(headers or {})
        return Reply(status, {"message": message}, h)

    def bad(self, message):
        return self.err(400, "BadRequestException", message)

    # ---- signature

    def verify_signature(self, rec):
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.compat import HTTPHeaders
        from botocore.credentials import Credentials

        hdrs = rec["headers"]
        auth = hdrs.get("authorization")
        if not auth:
            raise self.err(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        m = re.match(r"^AWS4-HMAC-SHA256\s+(.*)$", auth.strip())
        if not m:
            raise self.err(403, "IncompleteSignatureException",
                           "Authorization header requires the AWS4-HMAC-SHA256 algorithm.")
        params = {}
        for item in m.group(1).split(","):
            k, eq, v = item.strip().partition("=")
            if eq:
                params[k.strip()] = v.strip()
        missing = [p for p in ("Credential", "SignedHeaders", "Signature") if p not in params]
        if missing:
            raise self.err(403, "IncompleteSignatureException",
                           f"Authorization header requires '{missing[0]}' parameter. "
                           f"Authorization={auth}")
        scope = params["Credential"].split("/")
        if len(scope) != 5:
            raise self.err(403, "IncompleteSignatureException",
                           f"Credential should have exactly 5 slash-separated parts: "
                           f"{params['Credential']}")
        access, sdate, region, service, term = scope
        if access != self.fake.access_key:
            raise self.err(403, "UnrecognizedClientException",
                           "The security token included in the request is invalid.")
        amz_date = hdrs.get("x-amz-date")
        if amz_date is None and hdrs.get("date"):
            try:
                d = email.utils.parsedate_to_datetime(hdrs["date"])
                amz_date = d.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            except (TypeError, ValueError):
                amz_date = None
        if amz_date is None:
            raise self.err(403, "IncompleteSignatureException",
                           "Authorization header requires existence of either a 'X-Amz-Date' or a "
                           "'Date' header.")
        try:
            when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
                tzinfo=datetime.timezone.utc)
        except ValueError:
            raise self.err(403, "IncompleteSignatureException",
                           f"X-Amz-Date must be in the ISO8601 Long Format: {amz_date}")
        if sdate != amz_date[:8]:
            raise self.err(403, "InvalidSignatureException",
                           f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                           f"date from HTTP: '{sdate}' != '{amz_date[:8]}', from '{amz_date}'.")
        if region != self.fake.region:
            raise self.err(403, "InvalidSignatureException",
                           f"Credential should be scoped to a valid region, not '{region}'.")
        if service != "ses":
            raise self.err(403, "InvalidSignatureException",
                           "Credential should be scoped to correct service: 'ses'. ")
        if term != "aws4_request":
            raise self.err(403, "InvalidSignatureException",
                           f"Credential should be scoped with a valid terminator: 'aws4_request', "
                           f"not '{term}'.")
        now = datetime.datetime.now(datetime.timezone.utc)
        if abs((now - when).total_seconds()) > 15 * 60:
            raise self.err(403, "InvalidSignatureException",
                           f"Signature expired: {amz_date} is now earlier than "
                           f"{(now - datetime.timedelta(minutes=15)).strftime('%Y%m%dT%H%M%SZ')}.")
        signed = params["SignedHeaders"].split(";")
        if "host" not in signed:
            raise self.err(403, "InvalidSignatureException",
                           "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
        if "x-amz-date" in hdrs and "x-amz-date" not in signed:
            raise self.err(403, "InvalidSignatureException",
                           "'X-Amz-Date' must be a 'SignedHeader' in the AWS Authorization.")
        for name in signed:
            if name not in hdrs:
                raise self.err(403, "InvalidSignatureException", self.SIG_MISMATCH)
        token = hdrs.get("x-amz-security-token")
        if self.fake.session_token is None and token is not None:
            raise self.err(403, "UnrecognizedClientException",
                           "The security token included in the request is invalid.")
        if self.fake.session_token is not None and (token != self.fake.session_token
                                                    or "x-amz-security-token" not in signed):
            raise self.err(403, "UnrecognizedClientException",
                           "The security token included in the request is invalid.")
        sha = hdrs.get("x-amz-content-sha256")
        if sha is not None and sha != hashlib.sha256(rec["body"]).hexdigest():
            raise self.err(403, "InvalidSignatureException",
                           "The provided 'x-amz-content-sha256' header does not match what was "
                           "computed.")

        raw_pairs = rec["_raw_headers"]

        class _Exact(SigV4Auth):
            # Exactly the headers the client says it signed, with all their values as received.
            def headers_to_sign(self, request):
                hm = HTTPHeaders()
                for n, v in raw_pairs:
                    if n.lower() in signed:
                        hm[n.lower()] = v
                return hm

        req = AWSRequest(method=rec["method"], url=f"http://{hdrs['host']}{rec['path']}",
                         data=rec["body"],
                         params=[(urllib.parse.unquote(k), urllib.parse.unquote(v))
                                 for k, _, v in (p.partition("=") for p in rec["raw_query"].split("&") if p)])
        for n, v in raw_pairs:
            if n.lower() == "x-amz-content-sha256":
                req.headers["X-Amz-Content-SHA256"] = v
        req.context["timestamp"] = amz_date
        signer = _Exact(Credentials(self.fake.access_key, self.fake.secret_key,
                                    self.fake.session_token), "ses", self.fake.region)
        canonical = signer.canonical_request(req)
        sts = signer.string_to_sign(req, canonical)
        expected = signer.signature(sts, req)
        rec["sigv4"] = {"canonical_request": canonical, "string_to_sign": sts,
                        "expected": expected, "given": params["Signature"]}
        if not hmac.compare_digest(expected, params["Signature"]):
            raise self.err(403, "InvalidSignatureException", self.SIG_MISMATCH)

    # ---- body

    def address(self, v, what):
        a = mailbox(v)
        if a is None:
            raise self.bad(f"Invalid email address <{v}> in {what}.")
        local, _, domain = a.rpartition("@")
        if not local.isascii():
            raise self.bad(f"Local address contains control or whitespace or non-ASCII characters: "
                           f"<{v}> in {what}.")
        if not domain.isascii():
            raise self.bad(f"Domain contains illegal character (non-ASCII; use Punycode): <{v}> in "
                           f"{what}.")
        return a

    def string_list(self, v, what):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.bad(f"{what} must be a list of strings.")
        return v

    def charset_data(self, obj, what):
        if not isinstance(obj, dict) or set(obj) - {"Data", "Charset"} or not isinstance(obj.get("Data"), str):
            raise self.bad(f"{what} must be an object {{Data, Charset}} with a string Data.")
        if "Charset" in obj and not isinstance(obj["Charset"], str):
            raise self.bad(f"{what}.Charset must be a string.")

    def validate(self, rec):
        if rec["path"] != self.PATH:
            raise self.err(404, "UnknownOperationException", "Unknown operation.")
        if rec["method"] != "POST":
            raise self.err(405, "UnknownOperationException", "Unknown operation.")
        self.verify_signature(rec)
        ok, b = load_json(rec)
        if mime_type(rec["headers"]) != "application/json":
            raise self.bad("Content-Type must be application/json.")
        if not ok or not isinstance(b, dict):
            raise self.err(400, "SerializationException", "Could not parse the request body as a JSON "
                                                          "object.")
        for k in b:
            if k not in self.KEYS:
                raise self.bad(f"Unknown member '{k}'.")
        frm = b.get("FromEmailAddress")
        if frm is not None:
            if not isinstance(frm, str):
                raise self.bad("FromEmailAddress must be a string.")
            self.address(frm, "FromEmailAddress")
        content = b.get("Content")
        if not isinstance(content, dict):
            raise self.bad("Content is required.")
        kinds = [k for k in ("Simple", "Raw", "Template") if content.get(k) is not None]
        if len(kinds) != 1 or set(content) - {"Simple", "Raw", "Template"}:
            raise self.bad("Content must contain exactly one of Simple, Raw or Template.")
        recipients = []
        dest = b.get("Destination")
        if dest is not None:
            if not isinstance(dest, dict) or set(dest) - {"ToAddresses", "CcAddresses", "BccAddresses"}:
                raise self.bad("Destination must be an object {ToAddresses, CcAddresses, BccAddresses}.")
            for field, loc in (("ToAddresses", "to"), ("CcAddresses", "cc"), ("BccAddresses", "bcc")):
                for a in self.string_list(dest.get(field, []), f"Destination.{field}"):
                    recipients.append((self.address(a, f"Destination.{field}"), loc))
        if b.get("ReplyToAddresses") is not None:
            for a in self.string_list(b["ReplyToAddresses"], "ReplyToAddresses"):
                self.address(a, "ReplyToAddresses")
        if "Simple" in kinds:
            self.validate_simple(content["Simple"])
            if frm is None:
                raise self.bad("Missing required field FromEmailAddress.")
        elif "Raw" in kinds:
            mime_rcpts = self.validate_raw(rec, content["Raw"], frm)
            if dest is None:
                recipients = mime_rcpts
        else:
            t = content["Template"]
            if not isinstance(t, dict) or not (t.get("TemplateName") or t.get("TemplateArn")
                                               or t.get("TemplateContent")):
                raise self.bad("Template must name a TemplateName, TemplateArn or TemplateContent.")
            if frm is None:
                raise self.bad("Missing required field FromEmailAddress.")
        if not recipients:
            raise self.bad("Missing required field Destination: at least one recipient is required.")
        if len(recipients) > 50:
            raise self.bad("Recipient count exceeds 50.")
        tags = b.get("EmailTags")
        if tags is not None:
            if not isinstance(tags, list):
                raise self.bad("EmailTags must be a list of {Name, Value}.")
            for t in tags:
                if (not isinstance(t, dict) or set(t) - {"Name", "Value"}
                        or not isinstance(t.get("Name"), str) or not isinstance(t.get("Value"), str)
                        or not t["Name"] or len(t["Name"]) > 256 or len(t["Value"]) > 256
                        or not self.TAG_RE.match(t["Name"]) or not self.TAG_RE.match(t["Value"])):
                    raise self.bad("Tag names and values may only contain ASCII letters, numbers, "
                                   "underscores and dashes, at most 256 characters.")
        rec["pg_email_id"] = echoed_id(next((t["Value"] for t in tags or [] if t["Name"] == ID_KEY), None))
        if b.get("ConfigurationSetName") is not None and (
                not isinstance(b["ConfigurationSetName"], str) or not b["ConfigurationSetName"]):
            raise self.bad("ConfigurationSetName must be a non-empty string.")
        return recipients

    def validate_simple(self, s):
        if not isinstance(s, dict) or set(s) - {"Subject", "Body", "Headers", "Attachments"}:
            raise self.bad("Content.Simple must be an object {Subject, Body, Headers, Attachments}.")
        self.charset_data(s.get("Subject"), "Content.Simple.Subject")
        if has_crlf(s["Subject"]["Data"]):
            raise self.bad("Content.Simple.Subject may not contain line breaks.")
        body = s.get("Body")
        if not isinstance(body, dict) or set(body) - {"Text", "Html"} or not body:
            raise self.bad("Content.Simple.Body must hold Text and/or Html.")
        for k, v in body.items():
            self.charset_data(v, f"Content.Simple.Body.{k}")
        hs = s.get("Headers")
        if hs is not None:
            if not isinstance(hs, list) or len(hs) > 15:
                raise self.bad("Content.Simple.Headers must be a list of at most 15 {Name, Value}.")
            if not all(is_name_value(h) for h in hs):
                raise self.bad("Each header must be an object {Name, Value} of strings.")
        atts = s.get("Attachments")
        if atts is not None:
            if not isinstance(atts, list):
                raise self.bad("Content.Simple.Attachments must be a list.")
            allowed = {"RawContent", "ContentDisposition", "FileName", "ContentDescription",
                       "ContentId", "ContentTransferEncoding", "ContentType"}
            for a in atts:
                if not isinstance(a, dict) or set(a) - allowed:
                    raise self.bad("Invalid attachment object.")
                if b64(a.get("RawContent"), lenient_whitespace=False) is None:
                    raise self.bad("Attachment RawContent must be base64 encoded.")
                if not isinstance(a.get("FileName"), str) or not a["FileName"]:
                    raise self.bad("Attachment FileName is required.")
                if a.get("ContentDisposition") not in (None, "ATTACHMENT", "INLINE"):
                    raise self.bad("Attachment ContentDisposition must be ATTACHMENT or INLINE.")
                if a.get("ContentTransferEncoding") not in (None, "BASE64", "QUOTED_PRINTABLE",
                                                            "SEVEN_BIT"):
                    raise self.bad("Invalid attachment ContentTransferEncoding.")

    def validate_raw(self, rec, raw, frm):
        if not isinstance(raw, dict) or set(raw) - {"Data"}:
            raise self.bad("Content.Raw must be an object {Data}.")
        data = b64(raw.get("Data"), lenient_whitespace=False)
        if not data:
            raise self.bad("Content.Raw.Data must be a non-empty base64 string.")
        if b"\n\n" not in data.replace(b"\r\n", b"\n") and not data.replace(b"\r\n", b"\n").endswith(b"\n"):
            raise self.bad("Content.Raw.Data is not a MIME message (no header section).")
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
        rec["mime"] = msg
        if not msg.keys():
            raise self.bad("Content.Raw.Data is not a MIME message (no headers).")
        if frm is None and msg.get("From") is None:
            raise self.bad("Missing required header 'From'.")
        rcpts = []
        for field, loc in (("To", "to"), ("Cc", "cc"), ("Bcc", "bcc")):
            for h in msg.get_all(field, []):
                for part in split_list(str(h)):
                    if not part.strip():
                        continue
                    a = mailbox(part)
                    if a is None:
                        raise self.bad(f"Illegal address in the {field} header: {part.strip()}")
                    rcpts.append((a, loc))
        return rcpts

    def fail(self, status, retry_after):
        h = retry_headers(retry_after)
        types = {400: ("BadRequestException", "Bad request."),
                 403: ("AccessDeniedException", "Access denied."),
                 404: ("NotFoundException", "Resource not found."),
                 429: ("TooManyRequestsException", "Maximum sending rate exceeded."),
                 500: ("InternalServiceErrorException", "Internal service error."),
                 503: ("ServiceUnavailableException", "Service unavailable.")}
        etype, msg = types.get(status, ("InternalServiceErrorException" if status >= 500
                                        else "BadRequestException", reason(status) + "."))
        return self.err(status, etype, msg, h)

    def reject(self, rec, address, locator):
        return self.err(400, "MessageRejected", "Email address is not verified. The following "
                        f"identities failed the check in region {self.fake.region.upper()}: {address}")

    def success(self, rec):
        mid = f"0102{secrets.token_hex(6)}-{uuid.uuid4()}-000000"
        rec["message_id"] = mid
        return Reply(200, {"MessageId": mid},
                      {"x-amzn-RequestId": str(uuid.uuid4())}, accepted=True)
