"""Stored templates: save-time compilation, versions pinned per message, layouts and partials,
escaping, strict variables, sandbox limits, preview, and rendering in the worker."""
import email
import email.policy
import json
import time

import pytest

from conftest import wait_status, worker_pids


@pytest.fixture
def tpl(mail):
    mail.all("DELETE FROM email.templates WHERE name LIKE 'tt\\_%%'")
    mail.all("SELECT email.add_transport('tcap', 'capture://')")
    return mail


def captured(db, mid):
    wait_status(db, mid, "sent")
    raw = bytes(db.val("SELECT raw FROM email.captured WHERE message_id = %s", mid))
    return email.message_from_bytes(raw, policy=email.policy.default)


def text_of(msg, kind):
    part = msg.get_body((kind,))
    return part.get_content() if part is not None else None


@pytest.mark.on_citus
def test_syntax_errors_are_refused_with_part_line_and_column(tpl):
    code, msg = tpl.error("INSERT INTO email.templates (name, subject, body) VALUES ('tt_bad', 'Hi', E'line one\\nHello {{ name }')")
    assert code == "42601" and "body part, line 2, column" in msg, msg
    code, msg = tpl.error("INSERT INTO email.templates (name, subject, body, html) VALUES ('tt_bad', 'Hi', 'x', '<p>{% if %}</p>')")
    assert code == "42601" and "html part, line 1" in msg, msg
    tpl.all("INSERT INTO email.templates (name, subject, body) VALUES ('tt_ok', 'Hi {{ name }}', 'Hello {{ name }}')")
    code, msg = tpl.error("UPDATE email.templates SET subject = '{{ name ' WHERE name = 'tt_ok'")
    assert code == "42601" and "subject part" in msg
    assert tpl.val("SELECT version FROM email.templates WHERE name = 'tt_ok'") == 1


@pytest.mark.on_citus
def test_queued_message_keeps_its_version(tpl):
    tpl.all("INSERT INTO email.templates (name, subject, body) VALUES ('tt_v', 'Order {{ n }}', 'Old text {{ n }}')")
    mid = tpl.val("SELECT email.send_template('tt_v', 'a@x.test', '{\"n\": 1}', transport => 'tcap', send_at => now() + interval '2 seconds')")
    tpl.all("UPDATE email.templates SET body = 'New text {{ n }}' WHERE name = 'tt_v'")
    assert tpl.val("SELECT version FROM email.templates WHERE name = 'tt_v'") == 2
    assert tpl.val("SELECT template_version FROM email.messages WHERE id = %s", mid) == 1
    m = captured(tpl, mid)
    assert text_of(m, "plain").strip() == "Old text 1"
    mid2 = tpl.val("SELECT email.send_template('tt_v', 'a@x.test', '{\"n\": 2}', transport => 'tcap')")
    assert text_of(captured(tpl, mid2), "plain").strip() == "New text 2"
    assert tpl.val("SELECT count(*) FROM email.template_versions WHERE name = 'tt_v'") == 2


@pytest.mark.on_citus
def test_layouts_partials_escaping_and_preview_equals_delivery(tpl):
    tpl.all("""INSERT INTO email.templates (name, subject, body, html) VALUES
        ('tt_base', '[Shop] {% block s %}{% endblock %}',
         E'{% block b %}{% endblock %}\\n-- {% include "tt_footer" %}',
         '<html><body>{% block b %}{% endblock %}{% include "tt_footer" %}</body></html>'),
        ('tt_footer', 'unused', 'The Shop', '<footer>The Shop</footer>')""")
    tpl.all("""INSERT INTO email.templates (name, subject, body, html) VALUES ('tt_order',
        '{% extends "tt_base" %}{% block s %}Order {{ order.id }}{% endblock %}',
        '{% extends "tt_base" %}{% block b %}Hi {{ name }}, {% for i in order.items %}{{ i }};{% endfor %}{% endblock %}',
        '{% extends "tt_base" %}{% block b %}<p>Hi {{ name }}</p>{% endblock %}')""")
    data = json.dumps({"name": "<script>alert(1)</script>", "order": {"id": 42, "items": ["a", "b"]}})
    preview = tpl.one("SELECT subject, body, html FROM email.render('tt_order', %s)", data)
    assert preview[0] == "[Shop] Order 42"
    assert preview[1] == "Hi <script>alert(1)</script>, a;b;\n-- The Shop"
    assert "<p>Hi &lt;script&gt;alert(1)&lt;&#x2f;script&gt;</p>" in preview[2] and "<footer>The Shop</footer>" in preview[2]
    mid = tpl.val("SELECT email.send_template('tt_order', 'a@x.test', %s, transport => 'tcap')", data)
    m = captured(tpl, mid)
    assert m["subject"] == preview[0]
    assert text_of(m, "plain").replace("\r\n", "\n") == preview[1]
    assert text_of(m, "html").replace("\r\n", "\n") == preview[2]
    code, msg = tpl.error("DELETE FROM email.templates WHERE name = 'tt_footer'")
    assert code == "2BP01" and "tt_base" in msg


@pytest.mark.on_citus
def test_missing_variable_fails_at_enqueue_and_defaults_pass(tpl):
    tpl.all("INSERT INTO email.templates (name, subject, body) VALUES ('tt_strict', 'Hi {{ name }}', 'x')")
    code, msg = tpl.error("SELECT email.send_template('tt_strict', 'a@x.test', '{}', transport => 'tcap')")
    assert code == "22023" and '"name"' in msg and "tt_strict" in msg, msg
    tpl.all("""INSERT INTO email.templates (name, subject, body) VALUES ('tt_soft',
        'Hi {{ name | default("friend") }}', '{% if coupon is defined %}{{ coupon }}{% else %}no coupon{% endif %}')""")
    mid = tpl.val("SELECT email.send_template('tt_soft', 'a@x.test', '{}', transport => 'tcap')")
    m = captured(tpl, mid)
    assert m["subject"] == "Hi friend" and text_of(m, "plain").strip() == "no coupon"


def test_newline_in_rendered_subject_is_refused(tpl):
    tpl.all("INSERT INTO email.templates (name, subject, body) VALUES ('tt_subj', 'Hi {{ name }}', 'x')")
    code, msg = tpl.error("SELECT email.send_template('tt_subj', 'a@x.test', %s, transport => 'tcap')", json.dumps({"name": "x\r\nBcc: evil@z.test"}))
    assert code == "22023" and "line break" in msg


def test_html_only_template_gets_a_text_part(tpl):
    tpl.all("""INSERT INTO email.templates (name, subject, html) VALUES ('tt_html', 'Hi',
        '<h1>Welcome</h1><p>Read <a href="https://shop.test/terms">the terms</a>.</p>')""")
    mid = tpl.val("SELECT email.send_template('tt_html', 'a@x.test', transport => 'tcap')")
    m = captured(tpl, mid)
    plain = text_of(m, "plain")
    assert "Welcome" in plain and "the terms" in plain and "https://shop.test/terms" in plain


def assert_still_up(db, start_time, pids):
    assert db.val("SELECT pg_postmaster_start_time()") == start_time
    assert set(worker_pids(db)) == pids


def test_hostile_templates_fail_fast_and_nothing_goes_down(tpl):
    start = tpl.val("SELECT pg_postmaster_start_time()")
    pids = set(worker_pids(tpl))
    tpl.all("""INSERT INTO email.templates (name, subject, body) VALUES
        ('tt_loop', 'x', '{% for i in range(1000000000) %}{{ i }}{% endfor %}'),
        ('tt_nested', 'x', '{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}'),
        ('tt_big', 'x', '{% for i in range(90000) %}{{ "y" * 1000 }}{% endfor %}')""")
    tpl.all("INSERT INTO email.templates (name, subject, body) VALUES ('tt_self', 'x', 'x')")
    tpl.all("""UPDATE email.templates SET body = 'again {% include "tt_self" %}' WHERE name = 'tt_self'""")
    for name, text in [("tt_loop", "range"), ("tt_nested", "fuel"), ("tt_self", "recursion"), ("tt_big", "max_message_size")]:
        t0 = time.monotonic()
        code, msg = tpl.error("SELECT email.send_template(%s, 'a@x.test', transport => 'tcap')", name)
        took = time.monotonic() - t0
        assert code == "22023" and text in msg, (name, msg)
        assert took < 1.0, (name, took)
        code, msg = tpl.error("SELECT * FROM email.render(%s)", name)
        assert text in msg
        assert_still_up(tpl, start, pids)
    with tpl.conn.cursor() as cur:
        cur.execute("SET pg_email.max_message_size = '50kB'")
    code, msg = tpl.error("SELECT * FROM email.render('tt_big')")
    assert "max_message_size" in msg
    with tpl.conn.cursor() as cur:
        cur.execute("RESET pg_email.max_message_size")
    # A message whose template turned hostile after it was queued fails in the worker with a
    # receipt; the worker stays up.
    tpl.all("INSERT INTO email.templates (name, subject, body) VALUES ('tt_later', 'x', 'fine')")
    mid = tpl.val("SELECT email.send_template('tt_later', 'a@x.test', transport => 'tcap', send_at => now() + interval '1 second')")
    tpl.all("UPDATE email.template_versions SET body = '{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}' WHERE name = 'tt_later' AND version = 1")
    wait_status(tpl, mid, "failed")
    assert "fuel" in tpl.val("SELECT response FROM email.receipts WHERE message_id = %s AND event = 'failed'", mid)
    assert_still_up(tpl, start, pids)
