"""HTTP provider transports end to end: SQL → worker → a local fake of each provider that
enforces the documented request shape (the fakes package beside this file)."""
import base64
import json

import pytest

from conftest import send, wait_status
from fakes import Fake

PROVIDERS = {
    "sendgrid": ("sendgrid+api://test-key@127.0.0.1:{port}?scheme=http", 27101),
    "postmark": ("postmark+api://test-key@127.0.0.1:{port}?scheme=http&message_stream=outbound", 27102),
    "resend": ("resend+api://test-key@127.0.0.1:{port}?scheme=http", 27103),
    "mailgun": ("mailgun+api://test-key:mg.example.test@127.0.0.1:{port}?scheme=http", 27104),
    "ses": ("ses+api://AKIDEXAMPLE:wJalr%2FXUtnFEMI%2BK7MDENG@127.0.0.1:{port}?scheme=http&region=eu-west-1", 27105),
}

ATTACHMENTS = json.dumps([
    {"filename": "report.csv", "content_type": "text/csv", "content": base64.b64encode(b"a,b\n1,2\n").decode()},
    {"filename": "logo.png", "content_type": "image/png", "content": base64.b64encode(b"\x89PNG-bytes").decode(), "content_id": "logo"},
])


@pytest.fixture(params=list(PROVIDERS))
def provider(request, mail):
    name = request.param
    dsn, port = PROVIDERS[name]
    fake = Fake(name, port)
    fake.start()
    mail.all("SELECT email.add_transport(%s, %s)", f"p_{name}", dsn.format(port=port))
    yield name, fake, f"p_{name}"
    fake.stop()


def events(mail, mid):
    return [r[0] for r in mail.all("SELECT event FROM email.receipts WHERE message_id = %s ORDER BY id", mid)]


def full_message(mail, transport):
    return send(mail, transport, recipients='"Doe, Jane" <jane@example.test>', cc="cc@example.test", bcc="bcc@example.test",
                reply_to="Help <help@example.test>", subject="Grüße ✓ order 42", body="Plain text", html='<p>HTML <img src="cid:logo"></p>',
                headers='{"X-Campaign": "spring"}', attachments=ATTACHMENTS, tags=["welcome", "q3"],
                metadata='{"order_id": "42"}', sender="Shop <shop@example.test>")


def test_every_field_reaches_the_provider(mail, provider):
    name, fake, transport = provider
    mid = full_message(mail, transport)
    wait_status(mail, mid, "sent")
    req = fake.accepted[-1]
    stored_id = mail.val("SELECT message_id FROM email.messages WHERE id = %s", mid)
    pid = mail.val("SELECT provider_message_id FROM email.messages WHERE id = %s", mid)
    assert pid and mail.val("SELECT provider_message_id FROM email.receipts WHERE message_id = %s AND event = 'sent'", mid) == pid
    if name == "sendgrid":
        b = req["json"]
        p = b["personalizations"][0]
        assert p["to"] == [{"email": "jane@example.test", "name": "Doe, Jane"}]
        assert p["cc"] == [{"email": "cc@example.test"}] and p["bcc"] == [{"email": "bcc@example.test"}]
        assert b["from"] == {"email": "shop@example.test", "name": "Shop"}
        assert b["reply_to"] == {"email": "help@example.test", "name": "Help"}
        assert b["subject"] == "Grüße ✓ order 42"
        assert b["content"] == [{"type": "text/plain", "value": "Plain text"}, {"type": "text/html", "value": '<p>HTML <img src="cid:logo"></p>'}]
        assert b["headers"] == {"X-Campaign": "spring", "Message-ID": stored_id}
        assert b["categories"] == ["welcome", "q3"] and b["custom_args"] == {"order_id": "42", "pg_email_id": str(mid)}
        atts = {a["filename"]: a for a in b["attachments"]}
        assert base64.b64decode(atts["report.csv"]["content"]) == b"a,b\n1,2\n" and atts["report.csv"]["disposition"] == "attachment"
        assert atts["logo.png"]["disposition"] == "inline" and atts["logo.png"]["content_id"] == "logo"
        assert req["headers"]["authorization"] == "Bearer test-key"
    elif name == "postmark":
        b = req["json"]
        assert b["From"] == "Shop <shop@example.test>" and b["To"] == '"Doe, Jane" <jane@example.test>'
        assert b["Cc"] == "cc@example.test" and b["Bcc"] == "bcc@example.test" and b["ReplyTo"] == "Help <help@example.test>"
        assert b["Subject"] == "Grüße ✓ order 42" and b["TextBody"] == "Plain text" and "cid:logo" in b["HtmlBody"]
        assert {"Name": "X-Campaign", "Value": "spring"} in b["Headers"] and {"Name": "Message-ID", "Value": stored_id} in b["Headers"]
        assert b["Tag"] == "welcome" and b["Metadata"] == {"order_id": "42", "pg_email_id": str(mid)} and b["MessageStream"] == "outbound"
        atts = {a["Name"]: a for a in b["Attachments"]}
        assert base64.b64decode(atts["report.csv"]["Content"]) == b"a,b\n1,2\n" and atts["logo.png"]["ContentID"] == "cid:logo"
        assert req["headers"]["x-postmark-server-token"] == "test-key"
        assert pid == fake.accepted[-1]["response"]["MessageID"]
    elif name == "resend":
        b = req["json"]
        assert b["from"] == "Shop <shop@example.test>" and b["to"] == ['"Doe, Jane" <jane@example.test>']
        assert b["cc"] == ["cc@example.test"] and b["bcc"] == ["bcc@example.test"] and b["reply_to"] == ["Help <help@example.test>"]
        assert b["subject"] == "Grüße ✓ order 42" and b["text"] == "Plain text"
        assert b["headers"] == {"X-Campaign": "spring", "Message-ID": stored_id}
        assert {"name": "welcome", "value": "true"} in b["tags"] and {"name": "order_id", "value": "42"} in b["tags"]
        assert {"name": "pg_email_id", "value": str(mid)} in b["tags"]
        atts = {a["filename"]: a for a in b["attachments"]}
        assert atts["logo.png"]["content_id"] == "logo"
        assert req["headers"]["idempotency-key"].startswith(stored_id.strip("<>"))
        assert pid == fake.accepted[-1]["response"]["id"]
    elif name == "mailgun":
        f = req["form"]
        assert f["from"] == ["Shop <shop@example.test>"] and f["to"] == ['"Doe, Jane" <jane@example.test>']
        assert f["cc"] == ["cc@example.test"] and f["bcc"] == ["bcc@example.test"]
        assert f["subject"] == ["Grüße ✓ order 42"] and f["text"] == ["Plain text"]
        assert f["h:X-Campaign"] == ["spring"] and f["h:Message-Id"] == [stored_id] and f["h:Reply-To"] == ["Help <help@example.test>"]
        assert f["o:tag"] == ["welcome", "q3"] and json.loads(f["v:order_id"][0]) == "42"
        assert json.loads(f["v:pg_email_id"][0]) == mid
        files = {(x["field"], x["filename"]): x for x in req["files"]}
        assert files[("attachment", "report.csv")]["content"] == b"a,b\n1,2\n"
        assert files[("inline", "logo")]["content"] == b"\x89PNG-bytes"
        assert req["path"] == "/v3/mg.example.test/messages"
        assert pid == fake.accepted[-1]["response"]["id"]
    elif name == "ses":
        b = req["json"]
        assert b["Destination"] == {"ToAddresses": ["jane@example.test"], "CcAddresses": ["cc@example.test"], "BccAddresses": ["bcc@example.test"]}
        assert b["FromEmailAddress"] == "Shop <shop@example.test>" and b["ReplyToAddresses"] == ["Help <help@example.test>"]
        assert {"Name": "welcome", "Value": "true"} in b["EmailTags"] and {"Name": "pg_email_id", "Value": str(mid)} in b["EmailTags"]
        m = req["mime"]
        assert m["Message-ID"] == stored_id and m["subject"] == "Grüße ✓ order 42" and m["X-Campaign"] == "spring"
        assert m.get_body(("plain",)).get_content().strip() == "Plain text"
        assert req["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
        assert pid == fake.accepted[-1]["response"]["MessageId"]
    # our message id, sent as custom data under pg_email_id, as each fake read it back
    assert req["pg_email_id"] == mid
    assert "wJalr" not in json.dumps(mail.all("SELECT * FROM email.transports"), default=str)


def test_429_with_retry_after_is_honoured(mail, provider):
    name, fake, transport = provider
    fake.fail_next(429, retry_after="2")
    mid = send(mail, transport)
    wait_status(mail, mid, "sent")
    assert events(mail, mid) == ["deferred", "sent"]
    refused_at = [r for r in fake.requests if r["status"] == 429][-1]["at"]
    assert fake.accepted[-1]["at"] - refused_at >= 2.0
    assert mail.val("SELECT smtp_code FROM email.receipts WHERE message_id = %s AND event = 'deferred'", mid) == 429


def test_500_is_deferred_then_sent(mail, provider):
    name, fake, transport = provider
    fake.fail_next(500)
    mid = send(mail, transport)
    wait_status(mail, mid, "sent")
    assert events(mail, mid) == ["deferred", "sent"]


def test_401_fails_with_the_providers_message(mail, provider):
    name, fake, transport = provider
    fake.fail_next(401)
    mid = send(mail, transport)
    wait_status(mail, mid, "failed")
    r = mail.one("SELECT event, smtp_code, response FROM email.receipts WHERE message_id = %s", mid)
    assert r[0] == "failed" and r[1] == 401 and len(r[2]) > len("HTTP 401: ")
    assert "test-key" not in r[2]


def test_recipient_level_rejection_bounces_and_suppresses(mail, provider):
    name, fake, transport = provider
    bad = f"gone-{name}@example.test"
    mail.all("DELETE FROM email.suppressions WHERE address = %s", bad)
    fake.reject_address(bad)
    mid = send(mail, transport, recipients=bad)
    wait_status(mail, mid, "bounced")
    assert events(mail, mid) == ["bounced"]
    assert mail.val("SELECT reason FROM email.suppressions WHERE address = %s", bad) == "bounced"


def test_failover_to_the_fallback_transport(mail):
    with Fake("postmark", 27110) as down, Fake("resend", 27111) as backup:
        down.set_down(True)
        mail.all("SELECT email.add_transport('fb_backup', 'resend+api://test-key@127.0.0.1:27111?scheme=http')")
        mail.all("SELECT email.add_transport('fb_primary', 'postmark+api://test-key@127.0.0.1:27110?scheme=http&timeout=2s', fallback => 'fb_backup')")
        mid = send(mail, "fb_primary")
        wait_status(mail, mid, "sent")
        rows = mail.all("SELECT event, transport FROM email.receipts WHERE message_id = %s ORDER BY id", mid)
        assert rows == [("deferred", "fb_primary"), ("sent", "fb_backup")]
        assert len(backup.accepted) == 1


def test_rate_limit_holds_across_two_workers(mail):
    with Fake("resend", 27112) as fake:
        mail.all("SELECT email.add_transport('rated', 'resend+api://test-key@127.0.0.1:27112?scheme=http&rate=20/s')")
        assert mail.val("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_email worker'") == 2
        mail.all("SELECT email.send(recipients => 'r' || i || '@example.test', subject => 'rate', body => 'x', transport => 'rated', tags => ARRAY['rated']) FROM generate_series(1, 200) i")
        fake.wait_for(200, timeout=30)
        ats = sorted(r["at"] for r in fake.accepted)
        assert ats[-1] - ats[0] >= 9.5
        assert len({r["at"] for r in fake.accepted}) == 200
