"""Faults and hostile input (issue: prove it): a crash-under-load run, 10,000 hostile SQL calls,
and resource limits. Part of `make test`, so CI runs it."""
import json
import os
import random
import signal
import string
import subprocess
import threading
import time
import uuid

import psycopg2
import pytest

from conftest import CLUSTER_DIR, E2E_DIR, Db, connect, fresh, server_log, worker_pids
from servers import SmtpSink

PGBIN = "/usr/lib/postgresql/15/bin"
# Every SQLSTATE email.send, send_template and add_transport may answer bad input with.
DOCUMENTED = {
    "22023",  # invalid_parameter_value: a field refused by pg_email
    "42704",  # undefined_object: unknown transport or template
    "42601",  # syntax_error: template syntax
    "22P02",  # invalid_text_representation: JSON that is not JSON
    "22P05",  # untranslatable_character: \u0000 in JSON
    "22021",  # character_not_in_repertoire / invalid byte sequence
    "54000",  # program_limit_exceeded
    "54001",  # statement_too_complex (JSON nested too deep)
    "22001",  # string_data_right_truncation
}




def test_crash_under_load(mail):
    """4 clients enqueue at full speed for 60 s while the worker drains to smtp-sink; the worker
    is killed with SIGKILL every 15 s and the server is restarted once with -m immediate."""
    duration = 60.0
    with SmtpSink(26601, os.path.join(E2E_DIR, "sink-load")) as sink:
        mail.all("SELECT email.add_transport('load', 'smtp://127.0.0.1:26601?tls=none&max_connections=8')")
        tag = f"load-{uuid.uuid4().hex[:6]}"
        committed, rolled_back = set(), set()
        lock = threading.Lock()
        stop = time.monotonic() + duration

        def client(n):
            conn = None
            i = 0
            while time.monotonic() < stop:
                try:
                    if conn is None:
                        conn = connect("mail", autocommit=False)
                    with conn.cursor() as cur:
                        i += 1
                        cur.execute("SELECT email.send(recipients => 'a@x.test', subject => %s, body => 'x', transport => 'load', tags => ARRAY[%s])",
                                    (f"{tag} {n}-{i}", tag))
                        mid = cur.fetchone()[0]
                        cur.execute("SELECT message_id FROM email.messages WHERE id = %s", (mid,))
                        header_id = cur.fetchone()[0]
                    if i % 10 == 0:
                        conn.rollback()
                        with lock:
                            rolled_back.add(header_id)
                    else:
                        conn.commit()
                        with lock:
                            committed.add(header_id)
                except psycopg2.Error:
                    try:
                        conn.close()
                    except Exception:
                        pass
                    conn = None
                    time.sleep(0.2)
            if conn is not None:
                conn.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        crashes = 0
        t0 = time.monotonic()
        for at in (15, 30, 45):
            time.sleep(max(0, t0 + at - time.monotonic()))
            if at == 30:
                subprocess.run(["runuser", "-u", "postgres", "--", f"{PGBIN}/pg_ctl", "-D", os.path.join(CLUSTER_DIR, "data"), "-m", "immediate", "-w", "stop"], check=True, capture_output=True)
                subprocess.run(["runuser", "-u", "postgres", "--", f"{PGBIN}/pg_ctl", "-D", os.path.join(CLUSTER_DIR, "data"), "-l", os.path.join(CLUSTER_DIR, "server.log"), "-w", "start"], check=True, capture_output=True)
            else:
                d = fresh()
                for p in worker_pids(d):
                    os.kill(p, signal.SIGKILL)
                d.conn.close()
            crashes += 1
        for t in threads:
            t.join()
        assert len(committed) > 1000, f"only {len(committed)} messages were committed in {duration} s"

        d = fresh()
        deadline = time.monotonic() + 180
        while True:
            left = d.val("SELECT count(*) FROM email.messages WHERE %s = ANY(tags) AND status IN ('queued', 'sending')", tag)
            if left == 0:
                break
            assert time.monotonic() < deadline, f"{left} messages still queued or sending"
            time.sleep(0.5)
        rows = dict(d.all("SELECT message_id, status::text FROM email.messages WHERE %s = ANY(tags)", tag))
        lost = [m for m in committed if m not in rows]
        assert not lost, f"{len(lost)} committed messages are missing"
        assert all(rows[m] == "sent" for m in committed)
        assert not (rolled_back & set(rows)), "a rolled-back message was stored"
        time.sleep(1.0)
        counts = {}
        for m in sink.message_ids():
            counts[m] = counts.get(m, 0) + 1
        assert not [m for m in committed if m not in counts], "a committed message never reached the sink"
        assert not (rolled_back & set(counts)), "a rolled-back message was sent"
        duplicates = sum(c - 1 for m, c in counts.items() if m in rows)
        max_in_flight = int(d.val("SHOW pg_email.max_in_flight"))
        workers = int(d.val("SHOW pg_email.workers"))
        assert duplicates <= max_in_flight * workers * crashes, duplicates
        print(f"crash under load: {len(committed)} committed, {len(rolled_back)} rolled back, {duplicates} duplicates after {crashes} crashes")
        d.conn.close()


def hostile_strings(rng):
    pieces = [
        "a@x.test", "\"Doe, Jane\" <j@x.test>", "'; DROP TABLE email.messages; --", "\\", "\\x00", "%s", "$1",
        "\r\nBcc: evil@z.test", "\t", "\x1b[31m", "Ⅿallory <admin@аpple.com>", "ｆｕｌｌ＠ｗｉｄｔｈ．ｃｏｍ", "\u202e", "\ufeff",
        "<>", "@", ",", "\"", "()", "=?utf-8?b?ZXZpbA==?=", "\U0001F4E7", "x" * 300, "{{ 7*7 }}", "{% include 'x' %}",
    ]
    n = rng.randint(0, 4)
    return "".join(rng.choice(pieces + [rng.choice(string.printable)]) for _ in range(n))


def hostile_json(rng):
    kind = rng.randint(0, 9)
    if kind == 0:
        return "{" * 2000 + "}" * 2000  # nested deep
    if kind == 1:
        return '{"a": "\\ud800"}'  # unpaired surrogate escape
    if kind == 2:
        return '{"a": "\\u0000"}'
    if kind == 3:
        return "not json"
    if kind == 4:
        return json.dumps({hostile_strings(rng): hostile_strings(rng)})
    if kind == 5:
        return json.dumps([{"filename": hostile_strings(rng), "content": hostile_strings(rng), "content_type": hostile_strings(rng)}])
    if kind == 6:
        return json.dumps([{"filename": "a.bin", "content": "QUJD" * rng.randint(0, 5), "content_id": hostile_strings(rng)}])
    if kind == 7:
        return json.dumps({"X-Ok": "x" * rng.randint(0, 2000)})
    if kind == 8:
        return "[" * 100 + "]" * 100
    return None


def test_ten_thousand_hostile_calls_never_crash_the_server(cluster):
    db = Db(connect("api"))
    db.all("SELECT email.add_transport('hostile', 'capture://', is_default => true)")
    db.all("DELETE FROM email.templates WHERE name = 'h_t'")
    db.all("INSERT INTO email.templates (name, subject, body) VALUES ('h_t', 'Hi {{ name }}', 'x {{ name | default(\"\") }}')")
    start_time = db.val("SELECT pg_postmaster_start_time()")
    log_before = len(server_log())
    rng = random.Random(20261123)
    big = "y" * (1024 * 1024)
    states = {}
    ok = 0
    for i in range(10_000):
        which = i % 3
        try:
            if which == 0:
                args = [hostile_strings(rng) if rng.random() < 0.7 else "a@x.test", hostile_strings(rng), hostile_strings(rng) or None,
                        hostile_json(rng) if rng.random() < 0.3 else None, hostile_json(rng) if rng.random() < 0.3 else None,
                        [hostile_strings(rng)] if rng.random() < 0.2 else None, hostile_strings(rng) if rng.random() < 0.2 else None]
                if i % 997 == 0:
                    args[2] = big
                db.all("SELECT email.send(recipients => %s, subject => %s, body => %s, headers => %s::jsonb, attachments => %s::jsonb, tags => %s, idempotency_key => %s)", *args)
            elif which == 1:
                data = hostile_json(rng) if rng.random() < 0.5 else json.dumps({"name": hostile_strings(rng)})
                db.all("SELECT email.send_template(template => %s, recipients => %s, data => %s::jsonb)",
                       rng.choice(["h_t", hostile_strings(rng)]), hostile_strings(rng) or "a@x.test", data)
            else:
                dsn = rng.choice(["smtp://", "smtps://", "sendgrid+api://", "ses+api://", "file://", "capture://", "gopher://", ""]) + hostile_strings(rng)
                db.all("SELECT email.add_transport(%s, %s)", rng.choice(["h_tr", hostile_strings(rng)]), dsn)
            ok += 1
        except psycopg2.Error as e:
            db.conn.rollback() if not db.conn.autocommit else None
            states[e.pgcode] = states.get(e.pgcode, 0) + 1
            assert e.pgcode in DOCUMENTED, f"call {i}: undocumented SQLSTATE {e.pgcode}: {e.pgerror}"
        except ValueError:
            ok += 1  # a string psycopg2 itself refuses to send (NUL); nothing reached the server
    print(f"hostile calls: {ok} accepted, refused by SQLSTATE: {states}")
    assert sum(states.values()) > 3000 and ok > 300
    assert db.val("SELECT pg_postmaster_start_time()") == start_time
    new_log = server_log()[log_before:]
    assert "terminated by signal" not in new_log and "server process" not in new_log, new_log[-2000:]
    db.conn.close()


def test_thirty_megabyte_attachment_is_refused_at_enqueue(cluster):
    db = Db(connect("api"))
    db.all("SELECT email.add_transport('big', 'capture://', is_default => true)")
    import base64
    payload = base64.b64encode(os.urandom(30 * 1024 * 1024)).decode()
    code, msg = db.error("SELECT email.send(recipients => 'a@x.test', subject => 's', body => 'b', attachments => %s::jsonb)",
                         json.dumps([{"filename": "big.bin", "content": payload}]))
    assert code == "22023" and "max_message_size" in msg and str(25 * 1024 * 1024) in msg
    db.conn.close()


def proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
    return cpu, rss


def test_down_server_with_ten_thousand_queued_neither_grows_nor_spins(mail):
    mail.all("ALTER SYSTEM SET pg_email.retry_base = '10s'")
    mail.all("ALTER SYSTEM SET pg_email.retry_max = '60s'")
    mail.all("SELECT pg_reload_conf()")
    try:
        mail.all("SELECT email.add_transport('down', 'smtp://127.0.0.1:26602?tls=none&timeout=2s')")
        # Start from a vacuumed queue: the crash test before leaves ~10^6 dead index entries
        # that autovacuum would clear over the next minutes, and this test measures the worker.
        mail.all("VACUUM email.messages")
        tag = f"down-{uuid.uuid4().hex[:6]}"
        mail.all("SELECT email.send(recipients => 'a@x.test', subject => 'down', body => 'x', transport => 'down', tags => ARRAY[%s]) FROM generate_series(1, 10000)", tag)
        time.sleep(5)  # first attempts under way
        pids = worker_pids(mail)
        before = {p: proc_stat(p) for p in pids}
        time.sleep(60)
        after = {p: proc_stat(p) for p in pids if os.path.exists(f"/proc/{p}")}
        assert set(after) == set(before), "a worker restarted"
        cpu = sum(after[p][0] - before[p][0] for p in pids)
        growth_kb = max(after[p][1] - before[p][1] for p in pids)
        attempts = mail.val("SELECT count(*) FROM email.receipts r JOIN email.messages m ON m.id = r.message_id WHERE %s = ANY(m.tags)", tag)
        print(f"down server: {attempts} attempts, worker CPU {cpu:.1f} s over 60 s, RSS growth {growth_kb} kB")
        assert attempts >= 10000, "every message was tried"
        assert cpu < 30.0, f"workers used {cpu:.1f} s of CPU in 60 s"
        assert growth_kb < 20 * 1024, f"worker RSS grew by {growth_kb} kB"
        assert mail.val("SELECT count(*) FROM email.messages WHERE %s = ANY(tags) AND status NOT IN ('queued', 'sending')", tag) == 0
        for _ in range(20):  # the workers update the same rows; a deadlock is retried
            try:
                mail.all("UPDATE email.messages SET status = 'cancelled' WHERE %s = ANY(tags) AND status = 'queued'", tag)
                break
            except psycopg2.errors.DeadlockDetected:
                time.sleep(0.2)
    finally:
        mail.all("ALTER SYSTEM RESET pg_email.retry_base")
        mail.all("ALTER SYSTEM RESET pg_email.retry_max")
        mail.all("SELECT pg_reload_conf()")
