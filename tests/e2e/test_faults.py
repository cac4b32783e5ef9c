"""Faults and hostile input (issue: prove it): two crash runs, 10,000 hostile SQL calls, and
resource limits. Part of `make test`, so CI runs it.

The two crash tests differ in what is going on when the server crashes:
  test_crash_safety_under_kill_and_immediate_stop  a pure drain of 5,000 queued messages, crashed
      at fixed points of its progress (1,000 / 2,000 / 3,000 sent);
  test_crash_under_load  4 clients enqueueing (a tenth of them rolled back) while the worker
      drains, crashed at fixed times; it adds what happens to transactions cut by a crash.
Both check the duplicate rule message by message (conftest.check_crash_copies). Each test that
depends on the queue starts from an empty outbox of its own (conftest.empty_outbox)."""
import base64
import json
import os
import random
import string
import threading
import time
import uuid

import psycopg2

from conftest import (E2E_DIR, Db, all_despite_deadlocks, check_crash_copies, connect, fresh, kill_workers,
                      restart_immediate, server_log, val_retry, wait_for_workers, wait_until, worker_pids)
from servers import SmtpSink

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


def test_crash_safety_under_kill_and_immediate_stop(empty_outbox):
    """A drain cut by three crashes: 5,000 messages are queued at once and drain to smtp-sink;
    when 1,000, 2,000 and 3,000 are sent the server crashes: the workers are SIGKILLed (the
    postmaster then restarts every backend), again, and then the server is stopped with
    -m immediate and started. Afterwards every message is sent and none is queued or sending;
    each reached the sink at least once, and more than once only for a crash that caught it in
    flight (check_crash_copies). Every wait has a generous deadline and fails naming what it
    waited for."""
    mail = empty_outbox
    total = 5000
    tag = f"drain-{uuid.uuid4().hex[:6]}"
    sent_q = "SELECT count(*) FROM email.messages WHERE %s = ANY(tags) AND status = 'sent'"
    with SmtpSink(26532, os.path.join(E2E_DIR, "sink-crash")) as sink:
        mail.all("SELECT email.add_transport('sink', 'smtp://127.0.0.1:26532?tls=none&max_connections=8')")
        mail.all("SELECT email.send(recipients => 'a@x.test', subject => 'crash ' || i, body => repeat('x', 2000), "
                 "transport => 'sink', tags => ARRAY[%s]) FROM generate_series(1, %s) i", tag, total)
        in_flight = []
        for crash, target in enumerate((total // 5, 2 * total // 5, 3 * total // 5), start=1):
            wait_until(lambda: val_retry(sent_q, tag) >= target, f"{target} of {total} sent before crash {crash}")
            in_flight.append(val_retry("SELECT count(*) FROM email.messages WHERE %s = ANY(tags) AND status = 'sending'", tag))
            if crash < 3:
                kill_workers()
            else:
                restart_immediate()
            wait_for_workers()
        wait_until(lambda: val_retry(sent_q, tag) == total, f"all {total} messages sent after the crashes", timeout=180, every=0.2)
        d = fresh()
        assert d.val("SELECT count(*) FROM email.messages WHERE %s = ANY(tags) AND status IN ('queued', 'sending')", tag) == 0
        copies, cut_short = check_crash_copies(d, sink, tag, crashes=3)
        assert max(in_flight) > 0, f"no crash came while a message was being sent: {in_flight}"
        print(f"drain crash: sending just before each crash {in_flight}; {sum(cut_short.values())} sends cut short, "
              f"{sum(copies.values()) - total} duplicates, most copies of one message {max(copies.values())}")
        d.conn.close()


def test_crash_under_load(empty_outbox):
    """4 clients enqueue at full speed for 60 s (every tenth transaction rolled back) while the
    worker drains to smtp-sink; the worker is killed with SIGKILL at 15 s and 45 s and the
    server is restarted with -m immediate at 30 s. Every committed message is stored, sent and
    seen by the sink; no rolled-back message is stored or sent; duplicates stay within one per
    crash that caught a message in flight (check_crash_copies), and in total within
    max_in_flight per worker per crash."""
    mail = empty_outbox
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
                restart_immediate()
            else:
                kill_workers()
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
        counts, _ = check_crash_copies(d, sink, tag, crashes)
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
    """10,000 calls of send, send_template and add_transport with hostile strings and JSON (fixed
    seed) end either accepted or refused with a documented SQLSTATE; the server never restarts
    and its log shows no backend killed by a signal. Runs in database `api` (no worker) with its
    own default transport and template."""
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
    """A 30 MB attachment is refused by email.send with 22023 naming max_message_size (25 MB)."""
    db = Db(connect("api"))
    db.all("SELECT email.add_transport('big', 'capture://', is_default => true)")
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


def test_down_server_with_ten_thousand_queued_neither_grows_nor_spins(empty_outbox):
    """10,000 messages queued to a server that is down, starting from an empty outbox: every
    message is tried, the workers are not restarted and grow by under 20 MB each, every message
    is still queued or sending, and while they all wait for their retry the workers do not spin
    (under 3 s of CPU together in 20 s: CPU time, not wall time, so a loaded machine does not
    change it)."""
    mail = empty_outbox
    mail.all("ALTER SYSTEM SET pg_email.retry_base = '10min'")
    mail.all("ALTER SYSTEM SET pg_email.retry_max = '10min'")
    mail.all("SELECT pg_reload_conf()")
    try:
        mail.all("SELECT email.add_transport('down', 'smtp://127.0.0.1:26602?tls=none&timeout=2s')")
        tag = f"down-{uuid.uuid4().hex[:6]}"
        pids = worker_pids(mail)
        before = {p: proc_stat(p) for p in pids}
        mail.all("SELECT email.send(recipients => 'a@x.test', subject => 'down', body => 'x', transport => 'down', tags => ARRAY[%s]) FROM generate_series(1, 10000)", tag)
        attempts = "SELECT count(*) FROM email.receipts r JOIN email.messages m ON m.id = r.message_id WHERE %s = ANY(m.tags)"
        mail.wait(attempts.replace("count(*)", "count(*) >= 10000"), tag, timeout=300)
        mail.wait("SELECT count(*) = 0 FROM email.messages WHERE %s = ANY(tags) AND status = 'sending'", tag, timeout=60)
        settled = {p: proc_stat(p) for p in pids if os.path.exists(f"/proc/{p}")}
        time.sleep(20)
        after = {p: proc_stat(p) for p in pids if os.path.exists(f"/proc/{p}")}
        assert set(after) == set(before) == set(settled), "a worker restarted"
        idle_cpu = sum(after[p][0] - settled[p][0] for p in pids)
        growth_kb = max(after[p][1] - before[p][1] for p in pids)
        print(f"down server: {mail.val(attempts, tag)} attempts, worker CPU {idle_cpu:.2f} s in 20 s of waiting, RSS growth {growth_kb} kB")
        assert idle_cpu < 3.0, f"workers used {idle_cpu:.2f} s of CPU in 20 s with nothing due"
        assert growth_kb < 20 * 1024, f"worker RSS grew by {growth_kb} kB"
        assert mail.val("SELECT count(*) FROM email.messages WHERE %s = ANY(tags) AND status NOT IN ('queued', 'sending')", tag) == 0
        all_despite_deadlocks(mail, "UPDATE email.messages SET status = 'cancelled' WHERE %s = ANY(tags) AND status = 'queued'",
                              tag, attempts=20)
    finally:
        mail.all("ALTER SYSTEM RESET pg_email.retry_base")
        mail.all("ALTER SYSTEM RESET pg_email.retry_max")
        mail.all("SELECT pg_reload_conf()")
