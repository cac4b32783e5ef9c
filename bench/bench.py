"""make bench: pg_email's figures next to same-run baselines.

Starts its own cluster (2 workers and the listener: HTTP, and SMTP/LMTP inbound), smtp-sink, an
nginx responder and a latency sink, runs each benchmark, prints one Markdown table and writes the figures as JSON under
bench/results/. Every comparison measures both sides in the same run, interleaved, and reports
medians. `python3 bench/bench.py 9 10` (make bench BENCH_ONLY="9 10") runs only those rows."""
import asyncio
import base64
import collections
import email
import email.policy
import json
import os
import platform
import re
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from servers import AioSmtp  # noqa: E402
from stats_bench import stats_month_ms  # noqa: E402

PORT = int(os.environ.get("BENCH_PORT", "5496"))
DIR = "/var/tmp/pg_email-bench"
SINK_PORT, HTTP_PORT, LAT_PORT = 28025, 28080, 28026
# smtp-sink speaking LMTP: the baseline of bench 11 (moves to a free port when taken, main)
LMTP_SINK_PORT = 28027
# The listener (open pixel, clicks, webhooks); HTTP_PORT and LISTEN_PORT move to a free port
# when taken (main).
LISTEN_PORT = int(os.environ.get("BENCH_LISTEN_PORT", str(PORT + 1)))
LISTEN_URL = f"http://127.0.0.1:{LISTEN_PORT}"
# The listener's inbound SMTP/LMTP service (pg_email.inbound_address); moves like LISTEN_PORT.
INBOUND_PORT = int(os.environ.get("BENCH_INBOUND_PORT", str(PORT + 2)))
# The listener's SMTP submission service (pg_email.submission_address); moves like LISTEN_PORT.
SUBMISSION_PORT = int(os.environ.get("BENCH_SUBMISSION_PORT", str(PORT + 3)))
# pg_email.bounce_domain while bench 11 and the VERP-on half of bench 12 run (empty otherwise, so
# the other rows send plain envelopes).
BOUNCE_DOMAIN = "bounces.bench"
REPS = int(os.environ.get("BENCH_REPS", "3"))
BODY_1K = ("The quick brown fox jumps over the lazy dog. " * 23)[:1000]
BODY_2K = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 36)[:2000]
results = []
# A transparent 1×1 GIF (what nginx serves until bench 9 replaces it with the listener's own bytes).
PIXEL_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
             b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def connect(db="bench"):
    c = psycopg2.connect(host="127.0.0.1", port=PORT, dbname=db, user="postgres")
    c.autocommit = True
    return c


DB = None


def sql(q, *args):
    with DB.cursor() as cur:
        cur.execute(q, args if args else None)
        return cur.fetchall() if cur.description else None


def val(q, *args):
    r = sql(q, *args)
    return r[0][0] if r else None


def set_conf(**kw):
    for k, v in kw.items():
        sql(f"ALTER SYSTEM SET pg_email.{k} = '{v}'")
    sql("SELECT pg_reload_conf()")
    time.sleep(0.3)


def record(n, figure, value, unit, baseline=None, ratio=None, target="", met=None, extra=None):
    results.append({"n": n, "figure": figure, "value": value, "unit": unit, "baseline": baseline,
                    "ratio": ratio, "target": target, "met": met, **(extra or {})})
    log(f"  -> {figure}: {value} {unit}" + (f" (baseline {baseline}, ratio {ratio})" if baseline else ""))


def reset():
    # A worker's periodic work (reaping, folding statistics) may lock one of these tables while
    # the TRUNCATE waits for another: PostgreSQL ends one of the two as a deadlock; try again.
    for attempt in range(5):
        try:
            sql("TRUNCATE email.messages, email.receipts, email.attachments, email.captured, bench.plain "
                "RESTART IDENTITY CASCADE")
            break
        except psycopg2.errors.DeadlockDetected:
            if attempt == 4:
                raise
            time.sleep(0.5)
    sql("CHECKPOINT")


def free_port(preferred):
    """preferred when nothing listens on 127.0.0.1:preferred, else a port the kernel picks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def start_cluster():
    subprocess.run(["bash", os.path.join(ROOT, "scripts/cluster.sh"), "start", DIR, str(PORT), "bench",
                    f"pg_email.listen_address = '127.0.0.1:{LISTEN_PORT}'",
                    f"pg_email.inbound_address = '127.0.0.1:{INBOUND_PORT}'",
                    f"pg_email.submission_address = '127.0.0.1:{SUBMISSION_PORT}'",
                    "pg_email.workers = 2", "pg_email.max_in_flight = 256", "pg_email.batch_size = 500",
                    "pg_email.paused = on", "pg_email.default_sender = 'Bench <bench@example.org>'",
                    "shared_buffers = '1GB'", "max_wal_size = '8GB'", "checkpoint_timeout = '30min'",
                    "log_min_messages = warning"], check=True)


def pgbench(script, seconds=10, clients=4):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    os.chmod(f.name, 0o644)
    out = subprocess.run(["/usr/lib/postgresql/15/bin/pgbench", "-n", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
                          "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", "prepared", "-f", f.name, "bench"],
                         check=True, capture_output=True, text=True).stdout
    os.unlink(f.name)
    line = next(l for l in out.splitlines() if l.startswith("tps"))
    return float(line.split("=")[1].split()[0])


# pgbench scripts: one message of 1 KB to one recipient, through email.send, through an INSERT into
# the outbox, and into the plain copy of the outbox (the baseline of both).
SEND_SCRIPT = ("\\set id random(1, 1000000)\n"
               f"SELECT email.send(recipients => 'user' || :id || '@example.org', subject => 'Hello', body => '{BODY_1K}', transport => 'sink');\n")
INSERT_SCRIPT = ("\\set id random(1, 1000000)\n"
                 "INSERT INTO email.messages (recipients, subject, body, transport) "
                 f"VALUES (ARRAY['user' || :id || '@example.org'], 'Hello', '{BODY_1K}', 'sink');\n")
PLAIN_SCRIPT = ("\\set id random(1, 1000000)\n"
                "INSERT INTO bench.plain (status, transport, sender, recipients, subject, body, message_id, created_by) "
                f"VALUES ('queued', 'sink', 'Bench <bench@example.org>', ARRAY['user' || :id || '@example.org'], 'Hello', '{BODY_1K}', "
                "'<' || gen_random_uuid() || '@example.org>', current_user);\n")


def interleaved(ours_run, base_run):
    """REPS runs of each side, alternating, each from an empty outbox: (ours, base, median of
    ours, median of base, and the runs for the record)."""
    ours, base = [], []
    for _ in range(REPS):
        reset()
        ours.append(ours_run())
        reset()
        base.append(base_run())
    o, b = statistics.median(ours), statistics.median(base)
    return o, b, {"runs": [round(x) for x in ours], "baseline_runs": [round(x) for x in base]}


def bench_enqueue():
    log("1. enqueue TPS, pgbench, 4 clients")
    o, b, runs = interleaved(lambda: pgbench(SEND_SCRIPT), lambda: pgbench(PLAIN_SCRIPT))
    record(1, "enqueue, pgbench 4 clients, email.send 1 recipient 1 KB", round(o), "tx/s", round(b), round(o / b, 2), "ratio ≥ 0.70", o / b >= 0.70, extra=runs)


def timed(q):
    t = time.monotonic()
    sql(q)
    return time.monotonic() - t


def bench_bulk():
    log("2. bulk enqueue 100,000")
    n = 100_000
    ours, base = [], []
    for _ in range(REPS):
        reset()
        ours.append(n / timed(f"SELECT count(email.send(recipients => 'user' || i || '@example.org', subject => 'Hello', body => '{BODY_1K}', transport => 'sink')) FROM generate_series(1, {n}) i"))
        reset()
        base.append(n / timed("INSERT INTO bench.plain (status, transport, sender, recipients, subject, body, message_id, created_by) "
                              f"SELECT 'queued', 'sink', 'Bench <bench@example.org>', ARRAY['user' || i || '@example.org'], 'Hello', '{BODY_1K}', "
                              f"'<' || gen_random_uuid() || '@example.org>', current_user FROM generate_series(1, {n}) i"))
    o, b = statistics.median(ours), statistics.median(base)
    record(2, "bulk enqueue, email.send over generate_series(1, 100000)", round(o), "rows/s", round(b), round(o / b, 2), "ratio ≥ 0.50", o / b >= 0.50, extra={"runs": [round(x) for x in ours], "baseline_runs": [round(x) for x in base]})


def enqueue(n, transport, body=BODY_2K, chunk=100_000):
    done = 0
    while done < n:
        k = min(chunk, n - done)
        sql(f"SELECT count(email.send(recipients => 'user' || i || '@example.org', subject => 'Bench ' || i, body => %s, transport => '{transport}')) FROM generate_series(1, {k}) i", body)
        done += k


def sent_counter():
    """Messages the delivery workers recorded as sent since they started: their counters in
    shared memory (email.worker_status), bumped after each write-back commits."""
    return val("SELECT coalesce(sum(sent), 0) FROM email.worker_status() WHERE kind = 'delivery'")


def drain(until_sent, timeout=600):
    """Unpauses, waits until `until_sent` messages are sent (rows with status 'sent'), pauses;
    returns seconds. Progress is read from the workers' counters, which cost nothing to read, and
    the end is confirmed by counting the rows: counting them every 20 ms, as this did until 2 Dec
    2026, took about a fifth of a core from the drain it timed (a 50,000-row count each time)."""
    already = val("SELECT count(*) FROM email.messages WHERE status = 'sent'")
    base, sent = sent_counter(), already
    set_conf(paused="off")
    t = time.monotonic()
    counted = t
    while True:
        now = time.monotonic()
        # A row count once a second besides: the counters restart with a worker.
        if already + sent_counter() - base >= until_sent or now - counted >= 1:
            counted = now
            sent = val("SELECT count(*) FROM email.messages WHERE status = 'sent'")
            if sent >= until_sent:
                el = now - t
                break
        if now - t > timeout:
            raise RuntimeError(f"drain stalled at {sent}")
        time.sleep(0.01)
    set_conf(paused="on")
    return el


def drain_rate(n):
    """msg/s of a drain of n fresh 2 KB messages through the smtp-sink transport."""
    reset()
    enqueue(n, "sink")
    rate = n / drain(n)
    wait_idle()
    return rate


def wait_idle():
    while val("SELECT count(*) FROM email.messages WHERE status = 'sending'"):
        time.sleep(0.05)


def smtp_source(n, conns):
    t = time.monotonic()
    subprocess.run(["/usr/sbin/smtp-source", "-d", "-s", str(conns), "-m", str(n), "-l", "2048", "-f", "bench@example.org",
                    "-t", "user@example.org", f"127.0.0.1:{SINK_PORT}"], check=True, capture_output=True)
    return n / (time.monotonic() - t)


def bench_smtp_drain():
    log("3. SMTP drain of 50,000 2 KB messages to smtp-sink")
    n, conns = 50_000, 16
    ours, base = [], []
    for _ in range(REPS):
        reset()
        enqueue(n, "sink")
        ours.append(n / drain(n))
        wait_idle()
        base.append(smtp_source(n, conns))
    o, b = statistics.median(ours), statistics.median(base)
    record(3, f"SMTP drain, 50,000 × 2 KB to smtp-sink ({conns} connections)", round(o), "msg/s", round(b), round(o / b, 2),
           "≥ 5,000 msg/s and ratio ≥ 0.30", o >= 5000 and o / b >= 0.30, extra={"runs": [round(x) for x in ours], "baseline_runs": [round(x) for x in base]})


def start_nginx():
    """A private nginx (its own prefix, config, pid, logs and temp paths under DIR/nginx) on
    HTTP_PORT: the Resend API answer (bench 4), a static 1×1 GIF under /o/ (bench 9) and a 200 for
    webhook posts (bench 10). Returns the command line that addresses this instance."""
    d = os.path.join(DIR, "nginx")
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "pixel.gif"), "wb") as f:
        f.write(PIXEL_GIF)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_buffer_size 64k;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    keepalive_requests 1000000;
    types {{ image/gif gif; }}
    server {{
        listen 127.0.0.1:{HTTP_PORT};
        location = /emails {{ default_type application/json; return 200 '{{"id":"4ef9a417-02e9-4d39-ad75-9611e0fcc33c"}}'; }}
        location /o/ {{ root {www}; try_files /pixel.gif =404; add_header Cache-Control no-store; }}
        location /webhooks/ {{ default_type text/plain; return 200 'ok'; }}
    }}
}}
""")
    cmd = ["nginx", "-p", d + "/", "-e", os.path.join(d, "error.log"), "-c", conf]
    subprocess.run(cmd, check=True)
    return cmd


def bench_http_drain():
    log("4. HTTP drain of 20,000 messages through the Resend transport to nginx")
    n = 20_000
    lua = os.path.join(DIR, "post.lua")
    payload = json.dumps({"from": "Bench <bench@example.org>", "to": ["user@example.org"], "subject": "Bench", "text": BODY_2K})
    with open(lua, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(payload)}\nwrk.headers["Content-Type"] = "application/json"\n'
                'wrk.headers["Authorization"] = "Bearer k"\n')
    ours, base = [], []
    for _ in range(REPS):
        reset()
        enqueue(n, "http")
        ours.append(n / drain(n))
        wait_idle()
        out = subprocess.run(["wrk", "-t", "2", "-c", "32", "-d", "5s", "-s", lua, f"http://127.0.0.1:{HTTP_PORT}/emails"],
                             check=True, capture_output=True, text=True).stdout
        base.append(float(next(l for l in out.splitlines() if l.startswith("Requests/sec")).split()[1]))
    o, b = statistics.median(ours), statistics.median(base)
    record(4, "HTTP drain, 20,000 via resend+api to a local nginx", round(o), "msg/s", round(b), round(o / b, 2), "≥ 3,000 msg/s", o >= 3000, extra={"runs": [round(x) for x in ours], "baseline_runs": [round(x) for x in base]})


def bench_latency():
    log("5. latency from commit to acceptance, 2,000 sends 20 ms apart")
    srv = AioSmtp(LAT_PORT)
    srv.start()
    class Stamped(list):
        def append(self, m):
            m["at"] = time.monotonic()
            super().append(m)

    srv.messages = Stamped()
    try:
        reset()
        set_conf(paused="off")
        conn = connect()
        sent = {}
        with conn.cursor() as cur:
            for i in range(2000):
                cur.execute("SELECT email.send(recipients => 'lat@example.org', subject => 'lat', body => 'x', transport => 'lat')")
                mid = cur.fetchone()[0]
                sent[mid] = time.monotonic()  # autocommit: the commit has returned
                time.sleep(0.02)
        conn.close()
        deadline = time.monotonic() + 30
        while len(srv.messages) < 2000 and time.monotonic() < deadline:
            time.sleep(0.1)
        ids = dict(sql("SELECT id, message_id FROM email.messages"))
        arrived = {}
        for m in list(srv.messages):
            for line in m["data"].split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    arrived[line.split(b":", 1)[1].strip().decode()] = m["at"]
        lat = sorted((arrived[ids[i]] - t) * 1000 for i, t in sent.items() if ids.get(i) in arrived)
        p50 = lat[len(lat) // 2]
        p99 = lat[int(len(lat) * 0.99) - 1]
        record(5, "latency commit → accepted by the SMTP sink (2,000 sends, 20 ms apart)", round(p50, 2), "ms p50", None, None,
               "p50 ≤ 5 ms, p99 ≤ 25 ms", p50 <= 5 and p99 <= 25, {"p99_ms": round(p99, 2), "delivered": len(lat)})
        results[-1]["value_text"] = f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    finally:
        set_conf(paused="on")
        srv.stop()


def bench_queue_size():
    log("6. drain rate with 1,000,000 queued vs 10,000 queued")
    n = 10_000
    small, large = [], []
    reset()
    for _ in range(REPS):
        sql("TRUNCATE email.messages, email.receipts CASCADE")
        enqueue(n, "sink")
        small.append(n / drain(n))
        wait_idle()
    reset()
    enqueue(1_000_000, "sink")
    sql("VACUUM ANALYZE email.messages")
    base_sent = 0
    for _ in range(REPS):
        large.append(n / drain(base_sent + n))
        wait_idle()
        base_sent = val("SELECT count(*) FROM email.messages WHERE status = 'sent'")
    s, l = statistics.median(small), statistics.median(large)
    record(6, "drain rate with 1,000,000 queued vs 10,000 queued", round(l), "msg/s", round(s), round(l / s, 2), "ratio ≥ 0.80", l / s >= 0.80)


def worker_rss():
    pids = [r[0] for r in sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_email worker'")]
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            # RssAnon: the process's own memory. VmRSS would also count the shared buffers the
            # worker happens to touch, which grows with the data, not with a leak.
            total = max(total, next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")))
    return total, pids


def bench_rss():
    log("7. worker RSS growth over 200,000 messages")
    reset()
    enqueue(10_000, "sink")
    drain(10_000)  # warm up: pools, plans, caches
    wait_idle()
    before, pids = worker_rss()
    enqueue(200_000, "sink")
    drain(210_000)
    wait_idle()
    after, pids2 = worker_rss()
    assert pids == pids2, "a worker restarted during the run"
    growth = (after - before) / 1024
    record(7, "worker private memory (RssAnon) growth over 200,000 messages", round(growth, 1), "MB", None, None, "≤ 20 MB", growth <= 20,
           {"rss_before_mb": round(before / 1024, 1), "rss_after_mb": round(after / 1024, 1)})


def bench_templates():
    log("8. template renders/s")
    sql("DELETE FROM email.templates")
    sql("""INSERT INTO email.templates (name, subject, body, html) VALUES
        ('b_layout', '[Shop] {% block s %}{% endblock %}', '{% block b %}{% endblock %}\n-- {% include "b_footer" %}',
         '<html><body>{% block b %}{% endblock %}{% include "b_footer" %}</body></html>'),
        ('b_footer', 'x', 'The Shop, 1 Main St', '<footer>The Shop, 1 Main St</footer>')""")
    sql("""INSERT INTO email.templates (name, subject, body, html) VALUES ('b_order',
        '{% extends "b_layout" %}{% block s %}Order {{ order.id }}{% endblock %}',
        '{% extends "b_layout" %}{% block b %}Hi {{ name }},\n{% for i in order.items %}- {{ i.name }} × {{ i.qty }} = {{ i.price }}\n{% endfor %}{% endblock %}',
        '{% extends "b_layout" %}{% block b %}<p>Hi {{ name }}</p><table>{% for i in order.items %}<tr><td>{{ i.name }}</td><td>{{ i.qty }}</td><td>{{ i.price }}</td></tr>{% endfor %}</table>{% endblock %}')""")
    data = json.dumps({"name": "Ada <Lovelace>", "order": {"id": 42, "items": [{"name": f"item {k}", "qty": k, "price": f"{k * 3.5:.2f}"} for k in range(20)]}})
    n = 20_000
    rates = []
    for _ in range(REPS):
        t = time.monotonic()
        # data depends on g, so every row really renders (a constant call would run once)
        sql(f"SELECT count(*) FROM generate_series(1, {n}) g, LATERAL email.render('b_order', jsonb_set(%s::jsonb, '{{n}}', to_jsonb(g)))", data)
        rates.append(n / (time.monotonic() - t))
    record(8, "template renders/s (layout + include + 20-item loop, subject+text+html)", round(statistics.median(rates)), "renders/s",
           None, None, "report", None)


def wait_listener(timeout=120):
    """Waits until the listener answers GET /health with 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{LISTEN_URL}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the listener at {LISTEN_URL} does not answer /health after {timeout} s")
        time.sleep(0.2)


def run_wrk(url, seconds=10, conns=32, threads=2, headers=()):
    """wrk against url; its request count, rate, latency p99 and errors."""
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout

    def find(pattern):
        m = re.search(pattern, out)
        return m.groups() if m else None

    p99 = find(r"\n\s*99%\s+([\d.]+)(us|ms|s)\b")
    errors = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    return {
        "requests": int(find(r"(\d+) requests in")[0]),
        "rps": float(find(r"Requests/sec:\s+([\d.]+)")[0]),
        "non2xx": int((find(r"Non-2xx or 3xx responses: (\d+)") or ("0",))[0]),
        "errors": sum(int(e) for e in errors) if errors else 0,
        "p99_ms": float(p99[0]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99[1]] if p99 else None,
        "output": out,
    }


def tracked_pixel():
    """Sends one tracked message through the capture transport; its id, the path of its open
    pixel on the listener, and the pixel's bytes."""
    html = '<html><body><p>Hello, <a href="https://example.org/welcome?a=1&amp;b=2">welcome</a>.</p></body></html>'
    mid = val("SELECT email.send(recipients => 'reader@example.org', subject => 'Pixel', body => 'Hello', html => %s, "
              "transport => 'cap', track_opens => true, track_clicks => true)", html)
    drain(1)
    wait_idle()
    raw = bytes(val("SELECT raw FROM email.captured WHERE message_id = %s", mid))
    part = email.message_from_bytes(raw, policy=email.policy.default).get_body(("html",)).get_content()
    m = re.search(r'<img[^>]*\ssrc="' + re.escape(LISTEN_URL) + r'(/o/[^"]+)"', part)
    assert m, f"no open pixel pointing at {LISTEN_URL} in the tracked message: {part}"
    with urllib.request.urlopen(LISTEN_URL + m.group(1), timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "image/gif", (r.status, r.headers)
        gif = r.read()
    return mid, m.group(1), gif


def opens_stored(mid):
    return val("SELECT count(*) FROM email.receipts WHERE message_id = %s AND event = 'opened'", mid)


def wait_opens_stored(mid, before, answered, timeout=300):
    """Waits until at least `answered` new opens of mid are stored and the count has stopped
    moving for a second; returns how many were stored."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        n = opens_stored(mid) - before
        if n != last:
            last, since = n, time.monotonic()
        if n >= answered and time.monotonic() - since >= 1.0:
            return n
        if time.monotonic() > deadline:
            raise AssertionError(f"{n} of the {answered} open-pixel hits wrk saw answered are stored after {timeout} s")
        time.sleep(0.2)


def bench_pixel():
    log("9. open-pixel hits/s, wrk 32 connections, every hit stored; baseline nginx serving a static 1x1 GIF")
    conns = 32
    wait_listener()
    reset()
    mid, path, gif = tracked_pixel()
    with open(os.path.join(DIR, "nginx", "www", "pixel.gif"), "wb") as f:
        f.write(gif)  # nginx serves the very bytes the listener does
    ua = [f"User-Agent: {BROWSER}"]
    ours, base, p99s, base_p99s, stored_total = [], [], [], [], 0
    for _ in range(REPS):
        before = opens_stored(mid)
        w = run_wrk(LISTEN_URL + path, conns=conns, headers=ua)
        assert w["non2xx"] == 0, f"the listener answered {w['non2xx']} pixel hits with an error:\n{w['output']}"
        # wrk stops with up to one request per connection sent and not yet read: the listener may
        # have answered and stored those too, so up to `conns` (+ socket errors) more than wrk counted.
        stored = wait_opens_stored(mid, before, w["requests"])
        assert w["requests"] <= stored <= w["requests"] + conns + w["errors"], \
            f"wrk saw {w['requests']} hits answered, {stored} were stored:\n{w['output']}"
        stored_total += stored
        ours.append(w["rps"])
        p99s.append(w["p99_ms"])
        n = run_wrk(f"http://127.0.0.1:{HTTP_PORT}{path}", conns=conns, headers=ua)
        assert n["non2xx"] == 0, n["output"]
        base.append(n["rps"])
        base_p99s.append(n["p99_ms"])
    o, b = statistics.median(ours), statistics.median(base)
    record(9, f"open-pixel hits/s recorded, wrk -c{conns} GET /o/<token> of a tracked message (every hit stored)",
           round(o), "hits/s", round(b), round(o / b, 2), "≥ 10,000 hits/s", o >= 10000,
           {"p99_ms": statistics.median(p99s), "baseline_p99_ms": statistics.median(base_p99s), "hits_stored": stored_total})


def sendgrid_signer():
    """A fresh ECDSA P-256 key: sign(timestamp + body) as SendGrid's signed event webhook does,
    and the public key as the DSN option webhook_key wants it (base64 SPKI)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return (lambda data: key.sign(data, ec.ECDSA(hashes.SHA256()))), base64.b64encode(spki).decode()


def sendgrid_request(sign, path, events, ts):
    """One signed SendGrid event webhook POST, as bytes on the wire."""
    body = json.dumps(events, separators=(",", ":")).encode()
    sig = base64.b64encode(sign(str(ts).encode() + body)).decode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: SendGrid Event API\r\n"
            "Content-Type: application/json\r\n"
            f"X-Twilio-Email-Event-Webhook-Signature: {sig}\r\nX-Twilio-Email-Event-Webhook-Timestamp: {ts}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _post_all(port, requests, conns):
    todo = iter(requests)
    latencies, statuses = [], collections.Counter()

    async def connection():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for req in todo:
                t = time.perf_counter()
                writer.write(req)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                if length:
                    await reader.readexactly(length)
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[int(head.split(b" ", 2)[1])] += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(min(conns, len(requests)))))
    return time.perf_counter() - t0, latencies, statuses


def post_all(port, requests, conns):
    """Posts every prepared request over `conns` keep-alive connections (each takes the next one
    as soon as its previous answer is in); returns (seconds, latencies in ms, Counter of statuses).
    The same client measures the baseline: one Python process, so it caps both figures alike."""
    return asyncio.run(_post_all(port, requests, conns))


def p99(xs):
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def bench_webhooks():
    batches = int(os.environ.get("BENCH_WEBHOOK_BATCHES", "1000"))
    per, conns = 100, 16
    n = batches * per
    log(f"10. webhook events ingested/s: {batches} signed SendGrid batches of {per} delivered events, {conns} connections")
    wait_listener()
    reset()
    sign, public_key = sendgrid_signer()
    sql("SELECT email.add_transport('sg', %s)",
        f"sendgrid+api://SG.bench@default?webhook_key={urllib.parse.quote(public_key, safe='')}")
    enqueue(n, "sink", body="Hello")
    sql("UPDATE email.messages SET status = 'sent', sent_at = now(), attempts = 1")
    ids = [r[0] for r in sql("SELECT id FROM email.messages ORDER BY id")]
    assert len(ids) == n
    ts = int(time.time())
    path = "/webhooks/sg"
    reqs = [sendgrid_request(sign, path, [
        {"email": f"user{mid}@example.org", "timestamp": ts, "smtp-id": f"<bench-{mid}@example.org>", "event": "delivered",
         "category": ["bench"], "sg_event_id": f"bench-delivered-{mid}", "sg_message_id": f"bench{mid}.filter0001.1.0",
         "response": "250 2.0.0 OK: queued", "tls": 1, "pg_email_id": str(mid)}
        for mid in ids[i:i + per]], ts) for i in range(0, n, per)]
    # the listener reads the new transport's webhook key: an empty signed batch answers 200
    probe = [sendgrid_request(sign, path, [], ts)]
    deadline = time.monotonic() + 60
    while post_all(LISTEN_PORT, probe, 1)[2][200] != 1:
        assert time.monotonic() < deadline, "the listener does not take the sg transport's webhooks"
        time.sleep(0.2)
    ours, base, our_p99, base_p99 = [], [], [], []
    for _ in range(REPS):
        sql("TRUNCATE email.receipts, email.unmatched_events CASCADE")
        sql("UPDATE email.messages SET status = 'sent' WHERE status <> 'sent'")
        sql("VACUUM ANALYZE email.messages, email.receipts")
        secs, lat, statuses = post_all(LISTEN_PORT, reqs, conns)
        assert statuses == {200: batches}, f"the listener answered {dict(statuses)}"
        # answered 200 only after the commit: everything is there now
        stored = val("SELECT count(*) FROM email.receipts WHERE transport = 'sg' AND event = 'delivered' AND source = 'webhook'")
        delivered = val("SELECT count(*) FROM email.messages WHERE status = 'delivered'")
        assert stored == n and delivered == n, f"{n} events answered 200; {stored} receipts stored, {delivered} messages delivered"
        ours.append(n / secs)
        our_p99.append(p99(lat))
        secs, lat, statuses = post_all(HTTP_PORT, reqs, conns)
        assert statuses == {200: batches}, f"nginx answered {dict(statuses)}"
        base.append(n / secs)
        base_p99.append(p99(lat))
    o, b = statistics.median(ours), statistics.median(base)
    p, bp = statistics.median(our_p99), statistics.median(base_p99)
    record(10, f"webhook events ingested/s, signed SendGrid batches of {per} delivered events ({conns} connections, Python client)",
           round(o), "events/s", round(b), round(o / b, 2), "≥ 20,000 events/s", o >= 20000,
           {"p99_ms": round(p, 2), "baseline_p99_ms": round(bp, 2), "events": n, "batch": per, "connections": conns})
    results[-1]["value_text"] = f"{round(o):,} events/s, p99 {p:.1f} ms per batch (nginx p99 {bp:.1f} ms)"


def bounce_off():
    """pg_email.bounce_domain back to its default (empty: no VERP, the inbound service refuses
    the bounce domain)."""
    sql("ALTER SYSTEM RESET pg_email.bounce_domain")
    sql("SELECT pg_reload_conf()")
    time.sleep(0.3)


def bounce_dsn(seq):
    """A Postfix-style RFC 3464 bounce (multipart/report, about 2 KB, LF line ends) to
    bench@BOUNCE_DOMAIN about bench message `seq`, which does not exist: the inbound service
    parses it and stores it as kind 'bounce', matching nothing (no VERP token, an unknown
    Message-ID). seq is a fixed-width string, so every copy has the same size; its own
    Message-ID, queue id and recipient make each copy a distinct report."""
    qid = seq
    b = f"{qid}.1704164646/mx.bench.example"
    rcpt = f"bench@{BOUNCE_DOMAIN}"
    return f"""Return-Path: <>
Received: by mx.bench.example (Postfix)
\tid {qid}; Tue,  2 Jan 2024 03:04:06 +0000 (UTC)
Date: Tue,  2 Jan 2024 03:04:06 +0000 (UTC)
From: MAILER-DAEMON@mx.bench.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {rcpt}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="{b}"
Content-Transfer-Encoding: 8bit
Message-Id: <20240102030406.{qid}@mx.bench.example>

This is a MIME-encapsulated message.

--{b}
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.bench.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system

<user{seq}@example.net>: host mx.example.net[192.0.2.25] said: 550 5.1.1
    <user{seq}@example.net>: Recipient address rejected: User unknown in
    virtual mailbox table (in reply to RCPT TO command)

--{b}
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.bench.example
X-Postfix-Queue-ID: {qid}
X-Postfix-Sender: rfc822; {rcpt}
Arrival-Date: Tue,  2 Jan 2024 03:04:03 +0000 (UTC)

Final-Recipient: rfc822; user{seq}@example.net
Original-Recipient: rfc822;user{seq}@example.net
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.net
Diagnostic-Code: smtp; 550 5.1.1 <user{seq}@example.net>: Recipient
    address rejected: User unknown in virtual mailbox table

--{b}
Content-Description: Undelivered Message
Content-Type: message/rfc822
Content-Transfer-Encoding: 7bit

Return-Path: <{rcpt}>
From: Bench <bench@example.org>
To: user{seq}@example.net
Subject: Bench {seq}
Message-ID: <bench-gone-{seq}@example.org>
Date: Tue, 02 Jan 2024 03:04:02 +0000
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Hello, this is bench message {seq}.

--{b}--
"""


def lmtp_client(timeout=120):
    return smtplib.LMTP("127.0.0.1", INBOUND_PORT, local_hostname="client.bench", timeout=timeout)


def wait_inbound(timeout=120):
    """Waits until the inbound service answers LHLO and takes RCPT TO:<probe@BOUNCE_DOMAIN>."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            with lmtp_client(timeout=10) as c:
                c.ehlo()
                c.mail("")
                last = c.rcpt(f"probe@{BOUNCE_DOMAIN}")
                if last[0] == 250:
                    return
        except (OSError, smtplib.SMTPException) as e:
            last = e
        if time.monotonic() > deadline:
            raise RuntimeError(f"the inbound service on 127.0.0.1:{INBOUND_PORT} does not take mail for {BOUNCE_DOMAIN} "
                               f"after {timeout} s (last: {last!r})")
        time.sleep(0.2)


def wait_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def inbound_counts():
    """(rows, rows of kind bounce, rows matched to a message) of email.inbound."""
    return tuple(sql("SELECT count(*), count(*) FILTER (WHERE kind = 'bounce'), count(message_id) FROM email.inbound")[0])


def lmtp_send_all(batches):
    """Sends each batch of raw messages (CRLF bytes) over its own LMTP connection, all at once,
    MAIL FROM:<> RCPT TO:<bench@BOUNCE_DOMAIN>; returns seconds until every one is stored in
    email.inbound (every one answered 250, which the service gives after the commit)."""
    n = sum(len(b) for b in batches)
    errors, acked = [], [0] * len(batches)

    def client(k):
        try:
            with lmtp_client() as c:
                for raw in batches[k]:
                    c.sendmail("", [f"bench@{BOUNCE_DOMAIN}"], raw)
                    acked[k] += 1
        except Exception as e:  # reported below
            errors.append(f"connection {k} after {acked[k]} messages: {e!r}")

    threads = [threading.Thread(target=client, args=(k,), name=f"lmtp-{k}", daemon=True) for k in range(len(batches))]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    assert not any(th.is_alive() for th in threads), "an LMTP client did not finish within 600 s"
    assert not errors, errors
    deadline = time.monotonic() + 60
    while inbound_counts()[0] < n:
        assert time.monotonic() < deadline, f"{sum(acked)} messages answered 250, {inbound_counts()[0]} stored after 60 s"
        time.sleep(0.02)
    return time.monotonic() - t


def lmtp_source(n, conns, path):
    """smtp-source speaking LMTP: n copies of the message in `path` over conns connections to the
    LMTP smtp-sink; messages/s."""
    t = time.monotonic()
    subprocess.run(["/usr/sbin/smtp-source", "-L", "-c", "-d", "-s", str(conns), "-m", str(n), "-F", path,
                    "-M", "client.bench", "-f", "", "-t", f"bench@{BOUNCE_DOMAIN}", f"127.0.0.1:{LMTP_SINK_PORT}"],
                   check=True, capture_output=True)
    return n / (time.monotonic() - t)


def bench_inbound():
    per = int(os.environ.get("BENCH_INBOUND_PER_CONN", "2500"))
    conns = 8
    n = per * conns
    log(f"11. inbound messages/s: {n:,} ~2 KB Postfix bounces over {conns} LMTP connections, every one stored; "
        "baseline smtp-source -L into smtp-sink -L")
    path = os.path.join(DIR, "bounce.eml")
    sample = bounce_dsn("9" * 10)
    with open(path, "w") as f:
        f.write(sample)  # smtp-source -F ends each line with CRLF itself
    os.chmod(path, 0o644)
    size = len(sample.replace("\n", "\r\n").encode())
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-L", "-u", "postfix", f"127.0.0.1:{LMTP_SINK_PORT}", "4096"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(LMTP_SINK_PORT)
        set_conf(bounce_domain=BOUNCE_DOMAIN)
        wait_inbound()
        ours, base = [], []
        for r in range(REPS):
            sql("TRUNCATE email.inbound RESTART IDENTITY CASCADE")
            sql("CHECKPOINT")
            batches = [[bounce_dsn(f"{r:02d}{k:02d}{i:06d}").replace("\n", "\r\n").encode() for i in range(per)]
                       for k in range(conns)]
            ours.append(n / lmtp_send_all(batches))
            rows, bounces, matched = inbound_counts()
            assert (rows, bounces, matched) == (n, n, 0), \
                f"{n} bounces about no message sent: {rows} email.inbound rows, {bounces} of kind bounce, {matched} matched"
            base.append(lmtp_source(n, conns, path))
    finally:
        sink.terminate()
        sink.wait()
        bounce_off()
    o, b = statistics.median(ours), statistics.median(base)
    record(11, f"inbound messages/s, {n:,} × {size / 1024:.1f} KB Postfix DSNs over LMTP ({conns} Python smtplib connections), "
           "every one stored as a bounce", round(o), "msg/s", round(b), round(o / b, 2), "report", None,
           {"messages": n, "connections": conns, "message_bytes": size, "baseline_tool": "smtp-source -L → smtp-sink -L"})


def envelope_sender():
    """MAIL FROM of one message sent now through the 'lat' transport (an aiosmtpd sink)."""
    srv = AioSmtp(LAT_PORT)
    srv.start()
    try:
        reset()
        sql("SELECT email.send(recipients => 'verp@example.org', subject => 'verp', body => 'x', transport => 'lat')")
        drain(1, timeout=60)
        wait_idle()
        return srv.messages[0]["mail_from"]
    finally:
        srv.stop()


def bench_verp():
    n = 20_000
    log(f"12. SMTP drain of {n:,} 2 KB messages to smtp-sink, VERP on vs off")
    verp_re = re.compile(r"bounce\+[a-z2-7]{42}@" + re.escape(BOUNCE_DOMAIN))

    def run(verp):
        if verp:
            set_conf(bounce_domain=BOUNCE_DOMAIN)
        else:
            bounce_off()
        time.sleep(1)  # the delivery workers re-read it on SIGHUP
        sender = envelope_sender()
        assert bool(verp_re.fullmatch(sender or "")) == verp, f"VERP {'on' if verp else 'off'}: MAIL FROM:<{sender}>"
        return drain_rate(n)

    try:
        o, b = alternate(run)
    finally:
        bounce_off()
    record(12, f"SMTP drain with VERP on vs off, {n:,} × 2 KB to smtp-sink", round(o), "msg/s", round(b),
           round(o / b, 2), "ratio ≥ 0.90", o / b >= 0.90)


def alternate(run):
    """Medians of run(True) and run(False), REPS each, alternating which goes first."""
    on, off = [], []
    for r in range(REPS):
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            (on if flag else off).append(run(flag))
    return statistics.median(on), statistics.median(off)


def bench_topic():
    n = 100_000
    log(f"13. bulk enqueue {n:,} with topic => 'news', 10 % opted out, vs the same without a topic")
    sql("INSERT INTO email.topics (name, description, default_subscribed) VALUES ('news', 'Bench', true) ON CONFLICT DO NOTHING")
    sql("DELETE FROM email.subscriptions")
    sql(f"INSERT INTO email.subscriptions (address, topic, subscribed, source) "
        f"SELECT 'user' || i || '@example.org', 'news', false, 'api' FROM generate_series(10, {n}, 10) i")
    sql("ANALYZE email.subscriptions")
    send = ("SELECT count(email.send(recipients => 'user' || i || '@example.org', subject => 'Hello', "
            f"body => '{BODY_1K}', transport => 'sink'{{topic}})) FROM generate_series(1, {n}) i")

    def run(topic):
        reset()
        rate = n / timed(send.format(topic=", topic => 'news'" if topic else ""))
        if topic:
            dropped = val("SELECT count(*) FROM email.messages WHERE status = 'suppressed'")
            assert dropped == n // 10, f"{dropped} messages suppressed, expected {n // 10}"
            wrong = val("SELECT count(*) FROM email.messages m WHERE (m.status = 'suppressed') <> "
                        "(substring(m.recipients[1] FROM '^user([0-9]+)@')::int % 10 = 0)")
            assert wrong == 0, f"{wrong} messages suppressed or sent wrongly"
        return rate

    o, b = alternate(run)
    record(13, f"bulk enqueue with a topic (10 % opted out) vs without, {n:,} email.send", round(o), "rows/s", round(b),
           round(o / b, 2), "time ≤ 1.2× (ratio ≥ 0.83)", o / b >= 1 / 1.2)


def dkim_drain(n_row, algorithms, label):
    n = 20_000
    log(f"{n_row}. SMTP drain of {n:,} 2 KB messages to smtp-sink, DKIM-signed ({label}) vs unsigned")

    def run(signed):
        sql("DELETE FROM email.dkim_keys WHERE domain = 'example.org'")
        if signed:
            for alg in algorithms:
                sql("SELECT email.add_dkim_key('example.org', %s, algorithm => %s)", alg.split("-")[0], alg)
        return drain_rate(n)

    try:
        o, b = alternate(run)
    finally:
        sql("DELETE FROM email.dkim_keys WHERE domain = 'example.org'")
    record(n_row, f"SMTP drain DKIM-signed ({label}) vs unsigned, {n:,} × 2 KB to smtp-sink", round(o), "msg/s",
           round(b), round(o / b, 2), "report", None)


def bench_dkim():
    dkim_drain(14, ["rsa-sha256", "ed25519-sha256"], "RSA 2048 + Ed25519")


def bench_dkim_ed25519():
    dkim_drain(15, ["ed25519-sha256"], "Ed25519 only")

def bench_outbound():
    n = 20_000
    log(f"16. outbound webhooks: SMTP drain of {n:,} messages with a webhook on every 'sent' event (to nginx) vs without")
    url = f"http://127.0.0.1:{HTTP_PORT}/webhooks/outbound"
    set_conf(webhook_allow_hosts="127.0.0.1", webhook_concurrency=os.environ.get("WHC", "32"))

    def run(hooks):
        sql("DELETE FROM email.webhooks")
        if hooks:
            sql("SELECT email.add_webhook('bench', %s, ARRAY['sent'])", url)
        reset()
        enqueue(n, "sink")
        mail = n / drain(n)
        posted = None
        if hooks:
            # The drain timer started when mail was unpaused; deliveries keep going while paused.
            t = time.monotonic() - n / mail
            while val("SELECT count(*) FROM email.webhook_deliveries WHERE status = 'sent'") < n:
                if time.monotonic() - t > 600:
                    raise RuntimeError("webhook deliveries stalled")
                time.sleep(0.02)
            posted = n / (time.monotonic() - t)
            bad = val("SELECT count(*) FROM email.webhook_deliveries WHERE status <> 'sent' OR attempts <> 1")
            assert bad == 0, f"{bad} deliveries not sent at the first attempt"
        wait_idle()
        return mail, posted

    with_hooks, without = [], []
    try:
        for r in range(REPS):
            for hooks in ((False, True) if r % 2 == 0 else (True, False)):
                (with_hooks if hooks else without).append(run(hooks))
    finally:
        sql("DELETE FROM email.webhooks")
    lua = os.path.join(DIR, "hook.lua")
    with open(lua, "w") as f:
        f.write('wrk.method = "POST"\nwrk.body = \'{"type":"email.sent","data":{}}\'\n'
                'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["wrk", "-t", "2", "-c", "16", "-d", "5s", "-s", lua, url], check=True, capture_output=True,
                         text=True).stdout
    wrk = float(next(l for l in out.splitlines() if l.startswith("Requests/sec")).split()[1])
    posted = statistics.median(p for _, p in with_hooks)
    record(16, f"outbound webhook deliveries/s during an SMTP drain of {n:,} (one per sent message, to nginx)",
           round(posted), "deliveries/s", round(wrk), round(posted / wrk, 2), "≥ 5,000/s", posted >= 5000,
           extra={"baseline_is": "wrk, 16 connections, the same POST to the same nginx"})
    m_on, m_off = statistics.median(m for m, _ in with_hooks), statistics.median(m for m, _ in without)
    record(16, f"SMTP drain with webhook traffic vs without, {n:,} × 2 KB to smtp-sink", round(m_on), "msg/s",
           round(m_off), round(m_on / m_off, 2), "ratio ≥ 0.9", m_on / m_off >= 0.9)


def bench_stats():
    log("17. email.stats: one month at 10 million receipts (the fixture of bench/stats_gen.sql)")
    o, b, extra = stats_month_ms(DB)
    figure = (f"email.stats one month ({extra['rows']:,} rows, {extra['sent_in_month']:,} messages sent) at "
              f"{extra['receipts']:,} receipts, vs count(*) of the month's {extra['month_receipts']:,} receipts")
    record(17, figure, round(o, 1), "ms", round(b, 1), round(o / b, 2), "≤ 200 ms", o <= 200, extra)
    reset()


def api_key(name):
    """A key of a role that may send (made once per run), and its role."""
    if not val("SELECT count(*) FROM pg_roles WHERE rolname = 'bench_api'"):
        sql("CREATE ROLE bench_api")
        sql("GRANT USAGE ON SCHEMA email TO bench_api")
        sql("GRANT EXECUTE ON FUNCTION email.send, email.send_template TO bench_api")
    sql("DELETE FROM email.api_keys WHERE name = %s", name)
    key = val("SELECT email.create_api_key(%s, 'bench_api')", name)
    # The listener takes a new key at its next look at the configuration.
    deadline = time.monotonic() + 60
    while True:
        req = urllib.request.Request(f"{LISTEN_URL}/emails", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=5)
        except urllib.error.HTTPError as e:
            if e.code == 422:
                return key
        except OSError:
            pass  # the listener is not up yet
        if time.monotonic() > deadline:
            raise RuntimeError("the listener does not take the new API key")
        time.sleep(0.2)


def bench_send_api():
    log("18. HTTP send API (Resend's POST /emails, keep-alive, 32 connections) vs email.send over SQL (32 clients)")
    key = api_key("bench-http")
    sql("UPDATE email.transports SET is_default = (name = 'cap')")
    body = json.dumps({"from": "Bench <bench@example.org>", "to": "user@example.org", "subject": "bench",
                       "text": BODY_1K})
    lua = os.path.join(DIR, "send.lua")
    with open(lua, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                f'wrk.headers["Content-Type"] = "application/json"\n'
                f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    script = ("SELECT email.send(recipients => 'user@example.org', subject => 'bench', body => "
              f"'{BODY_1K}', sender => 'Bench <bench@example.org>');\n")
    ours, base, p99s = [], [], []
    for _ in range(REPS):
        reset()
        before = val("SELECT count(*) FROM email.messages")
        out = subprocess.run(["wrk", "-t", "2", "-c", "32", "-d", "10s", "--latency", "-s", lua, f"{LISTEN_URL}/emails"],
                             check=True, capture_output=True, text=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        assert not non2xx, f"the send API refused requests: {out}"
        stored = val("SELECT count(*) FROM email.messages") - before
        # wrk stops counting at the deadline: up to one request per connection was stored unanswered.
        assert 0 <= stored - total <= 32, f"{total} requests answered, {stored} messages stored"
        m = re.search(r"\n\s*99%\s+([\d.]+)(us|ms|s)\b", out)
        p99s.append(float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)])
        ours.append(rps)
        reset()
        base.append(pgbench(script, seconds=10, clients=32))
    o, b = statistics.median(ours), statistics.median(base)
    record(18, "HTTP send API: Resend POST /emails, 1 KB, keep-alive, 32 connections (wrk), vs email.send over SQL "
           "(pgbench, 32 clients)", round(o), "requests/s", round(b), round(o / b, 2), "ratio ≥ 0.5", o / b >= 0.5,
           extra={"p99_ms": round(statistics.median(p99s), 2)})
    sql("UPDATE email.transports SET is_default = false")
    reset()


async def submission_client(port, user, key, n, conns, sender="bench@example.org", to="user@example.org"):
    """n messages of 2 KB over `conns` SMTP connections (AUTH PLAIN when user is set), each
    transaction pipelined up to DATA; returns how many got 250."""
    auth = base64.b64encode(f"\0{user}\0{key}".encode()).decode() if user else None
    msg = (f"From: {sender}\r\nTo: {to}\r\nSubject: bench\r\n\r\n" + BODY_2K + "\r\n.\r\n").encode()
    ok = 0

    async def reply(r):
        while True:
            line = await r.readline()
            if not line:
                raise RuntimeError("connection closed")
            if line[3:4] != b"-":
                return line

    async def one(count):
        nonlocal ok
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await reply(r)
        w.write(b"EHLO bench\r\n")
        await reply(r)
        if auth:
            w.write(f"AUTH PLAIN {auth}\r\n".encode())
            line = await reply(r)
            assert line.startswith(b"235"), line
        for _ in range(count):
            w.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{to}>\r\nDATA\r\n".encode())
            for _ in range(3):
                await reply(r)
            w.write(msg)
            line = await reply(r)
            ok += line.startswith(b"250")
        w.write(b"QUIT\r\n")
        await reply(r)
        w.close()

    per = [n // conns + (1 if i < n % conns else 0) for i in range(conns)]
    await asyncio.gather(*(one(c) for c in per))
    return ok


def bench_submission():
    n, conns = 20_000, 32
    log(f"19. SMTP submission: {n:,} × 2 KB over {conns} connections (AUTH PLAIN, pipelined) vs smtp-source into smtp-sink")
    key = api_key("bench-smtp")
    sql("UPDATE email.transports SET is_default = (name = 'cap')")
    ours, base, client_only = [], [], []
    for _ in range(REPS):
        reset()
        t = time.monotonic()
        ok = asyncio.run(submission_client(SUBMISSION_PORT, "bench-smtp", key, n, conns))
        ours.append(n / (time.monotonic() - t))
        assert ok == n and val("SELECT count(*) FROM email.messages") == n, f"{ok} answered 250"
        base.append(smtp_source(n, conns))
        t = time.monotonic()
        asyncio.run(submission_client(SINK_PORT, None, None, n, conns))
        client_only.append(n / (time.monotonic() - t))
    o, b = statistics.median(ours), statistics.median(base)
    record(19, f"SMTP submission, {n:,} × 2 KB, {conns} connections (Python asyncio client), vs smtp-source into "
           "smtp-sink", round(o), "msg/s", round(b), round(o / b, 2), "ratio ≥ 0.3", o / b >= 0.3,
           extra={"same_client_into_smtp_sink": round(statistics.median(client_only))})
    sql("UPDATE email.transports SET is_default = false")
    reset()


def bench_insert():
    log("20. enqueue TPS, pgbench 4 clients, INSERT INTO email.messages")
    o, b, runs = interleaved(lambda: pgbench(INSERT_SCRIPT), lambda: pgbench(PLAIN_SCRIPT))
    record(20, "enqueue, pgbench 4 clients, INSERT INTO email.messages 1 recipient 1 KB", round(o), "tx/s", round(b),
           round(o / b, 2), "ratio ≥ 0.85", o / b >= 0.85, extra=runs)


def bench_insert_bulk():
    n = 100_000
    ours_sql = ("INSERT INTO email.messages (recipients, subject, body, transport) "
                f"SELECT ARRAY['user' || i || '@example.org'], 'Hello', '{BODY_1K}', 'sink' FROM generate_series(1, {n}) i")
    plain = ("INSERT INTO bench.plain (status, transport, sender, recipients, subject, body, message_id, created_by) "
             f"SELECT 'queued', 'sink', 'Bench <bench@example.org>', ARRAY['user' || i || '@example.org'], 'Hello', '{BODY_1K}', "
             f"'<' || gen_random_uuid() || '@example.org>', current_user FROM generate_series(1, {n}) i")
    for row, suppressed, target in [(21, 0, 0.70), (22, 10, 0.65)]:
        log(f"{row}. bulk INSERT INTO email.messages … SELECT 100,000, {suppressed} % suppressed")
        sql("TRUNCATE email.suppressions")
        if suppressed:
            sql(f"INSERT INTO email.suppressions (address) SELECT 'user' || i || '@example.org' FROM generate_series(1, {n}, {100 // suppressed}) i")
        def ours_run():
            rate = n / timed(ours_sql)
            got = val("SELECT count(*) FROM email.messages WHERE status = 'suppressed'")
            assert got == n * suppressed // 100, got
            return rate

        o, b, runs = interleaved(ours_run, lambda: n / timed(plain))
        record(row, f"bulk INSERT INTO email.messages … SELECT generate_series(1, 100000), {suppressed} % suppressed",
               round(o), "rows/s", round(b), round(o / b, 2), f"ratio ≥ {target:.2f}", o / b >= target, extra=runs)
    sql("TRUNCATE email.suppressions")


def restart_with(**settings):
    """Sets postmaster-level pg_email settings with ALTER SYSTEM (None: back to postgresql.conf)
    and restarts the cluster."""
    global DB
    for k, v in settings.items():
        sql(f"ALTER SYSTEM RESET pg_email.{k}" if v is None else f"ALTER SYSTEM SET pg_email.{k} = '{v}'")
    DB.close()
    subprocess.run(["bash", os.path.join(ROOT, "scripts/cluster.sh"), "restart", DIR], check=True)
    DB = connect()
    time.sleep(1)


def bench_defaults():
    """Rows 23 and 24: the drains of rows 3 and 4 with every setting at its default (workers,
    max_in_flight, batch_size, and the transports' own options)."""
    names = ("workers", "max_in_flight", "batch_size")
    boot = dict(sql("SELECT name, boot_val FROM pg_settings WHERE name = ANY(%s)", [f"pg_email.{n}" for n in names]))
    defaults = {n: boot[f"pg_email.{n}"] for n in names}
    restart_with(**defaults)
    try:
        conns = int(defaults["workers"]) * 4  # each worker opens up to max_connections (default 4) per transport
        log(f"23. SMTP drain of 50,000 2 KB messages, default settings {defaults}, vs smtp-source -s {conns}")
        n = 50_000
        ours, base = [], []
        for _ in range(REPS):
            reset()
            enqueue(n, "sink_defaults")
            ours.append(n / drain(n))
            wait_idle()
            base.append(smtp_source(n, conns))
        o, b = statistics.median(ours), statistics.median(base)
        record(23, f"SMTP drain, 50,000 × 2 KB to smtp-sink, default settings ({conns} connections)", round(o), "msg/s", round(b),
               round(o / b, 2), "ratio ≥ 0.45", o / b >= 0.45, {"runs": [round(x) for x in ours], "baseline_runs": [round(x) for x in base]})
        log("24. HTTP drain of 20,000 through resend+api to nginx, default settings")
        n = 20_000
        ours = []
        for _ in range(REPS):
            reset()
            enqueue(n, "http_defaults")
            ours.append(n / drain(n))
            wait_idle()
        o = statistics.median(ours)
        record(24, "HTTP drain, 20,000 via resend+api to a local nginx, default settings", round(o), "msg/s",
               target="≥ 30,000 msg/s", met=o >= 30_000, extra={"runs": [round(x) for x in ours]})
    finally:
        restart_with(**{n: None for n in names})


def pgbench_progress(script, seconds=60, clients=4):
    """tps of each 10 s interval of one pgbench run (pgbench -P 10)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    os.chmod(f.name, 0o644)
    out = subprocess.run(["/usr/lib/postgresql/15/bin/pgbench", "-n", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
                          "-c", str(clients), "-j", "2", "-T", str(seconds), "-P", "10", "-M", "prepared", "-f", f.name, "bench"],
                         check=True, capture_output=True, text=True)
    os.unlink(f.name)
    return [float(m) for m in re.findall(r"progress: [0-9.]+ s, ([0-9.]+) tps", out.stderr + out.stdout)]


def bulk_for(seconds, table, columns, select):
    """Rows/s of INSERT … SELECT statements of 10,000 rows run back to back for `seconds`: in
    the first 10 s and in the last 10 s."""
    done, start = [], time.monotonic()
    while time.monotonic() - start < seconds:
        sql(f"INSERT INTO {table} ({columns}) SELECT {select} FROM generate_series(1, 10000) i")
        done.append(time.monotonic() - start)
    return (sum(1 for t in done if t <= 10) * 1000.0, sum(1 for t in done if t > done[-1] - 10) * 1000.0)


def bench_flat():
    log("25. enqueue rates over 60 s: the last 10 s against the first 10 s, and the plain table's")
    plain_cols = "status, transport, sender, recipients, subject, body, message_id, created_by"
    plain_select = (f"'queued', 'sink', 'Bench <bench@example.org>', ARRAY['user' || i || '@example.org'], 'Hello', '{BODY_1K}', "
                    "'<' || gen_random_uuid() || '@example.org>', current_user")
    runs = {
        "email.send": lambda: pgbench_progress(SEND_SCRIPT),
        "INSERT": lambda: pgbench_progress(INSERT_SCRIPT),
        "plain INSERT": lambda: pgbench_progress(PLAIN_SCRIPT),
        "INSERT … SELECT": lambda: bulk_for(60, "email.messages", "recipients, subject, body, transport",
                                            f"ARRAY['user' || i || '@example.org'], 'Hello', '{BODY_1K}', 'sink'"),
        "plain INSERT … SELECT": lambda: bulk_for(60, "bench.plain", plain_cols, plain_select),
    }
    found = {}
    for label, run in runs.items():
        reset()
        rates = run()
        found[label] = (rates[0], rates[-1])
    ratios = {k: round(b / a, 2) for k, (a, b) in found.items()}
    text = "; ".join(f"{k} {round(a):,} → {round(b):,}/s ({ratios[k]})" for k, (a, b) in found.items())
    ours = [ratios[k] for k in ("email.send", "INSERT", "INSERT … SELECT")]
    worst = max(ours, key=lambda r: abs(1 - r))
    record(25, "enqueue over 60 s, first 10 s → last 10 s (pgbench 4 clients; INSERT … SELECT of 10,000 rows)", worst,
           "ratio", target="each within 10 %", met=all(0.9 <= r <= 1.1 for r in ours),
           extra={"value_text": text, "rates": found})
    reset()

def bench_citus():
    """Row 26: the drain of a distributed outbox (email.distribute) by one Citus worker node, then by
    two, on this one machine: each node's worker sends its own shards' mail to smtp-sink."""
    log("26. Citus: drain with 2 worker nodes vs 1")
    if subprocess.run(["bash", os.path.join(ROOT, "scripts", "citus.sh"), "--check"]).returncode != 0:
        record(26, "Citus drain, 2 worker nodes vs 1", 0, "msg/s", None, None, "report", None,
               extra={"skipped": "Citus is not installed (scripts/citus.sh)"})
        return
    n = 20_000
    base_port = free_port(PORT + 20)
    where = os.path.join(DIR, "citus")
    rates = {}
    for nodes in (1, 2, 1, 2, 1, 2)[:2 * REPS]:
        env = dict(os.environ, CITUS_WORKERS=str(nodes))
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "citus-cluster.sh"), "start", where, str(base_port), "bench",
                        "pg_email.paused = on", "fsync = off", "synchronous_commit = off"], check=True, env=env)
        try:
            c = psycopg2.connect(host="127.0.0.1", port=base_port, dbname="bench", user="postgres")
            c.autocommit = True
            cur = c.cursor()
            cur.execute("CREATE EXTENSION pg_email")
            cur.execute("SELECT email.distribute()")
            cur.execute(f"SELECT email.add_transport('sink', 'smtp://127.0.0.1:{SINK_PORT}?tls=none', is_default => true)")
            cur.execute("SELECT count(email.send(recipients => 'user' || i || '@example.org', subject => 'Bench ' || i, "
                        "body => %s, sender => 'bench@example.org')) FROM generate_series(1, %s) i", (BODY_2K, n))
            nodes_conns = []
            for i in range(nodes + 1):
                k = psycopg2.connect(host="127.0.0.1", port=base_port + i, dbname="bench", user="postgres")
                k.autocommit = True
                nodes_conns.append(k)
            t = time.monotonic()
            for k in nodes_conns:
                with k.cursor() as kc:
                    kc.execute("ALTER SYSTEM SET pg_email.paused = off")
                    kc.execute("SELECT pg_reload_conf()")
            while True:
                cur.execute("SELECT count(*) FROM email.messages WHERE status = 'sent'")
                if cur.fetchone()[0] >= n:
                    break
                if time.monotonic() - t > 600:
                    raise RuntimeError("the Citus drain stalled")
                time.sleep(0.05)
            rates.setdefault(nodes, []).append(n / (time.monotonic() - t))
            for k in nodes_conns:
                k.close()
            c.close()
        finally:
            subprocess.run(["bash", os.path.join(ROOT, "scripts", "citus-cluster.sh"), "stop", where], env=env)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    record(26, f"Citus drain, {n:,} × 2 KB to smtp-sink, 2 worker nodes (1 worker each) vs 1, on this one machine",
           round(two), "msg/s", round(one), round(two / one, 2),
           "report (one 2-core machine: overhead, not scale)", None,
           extra={"runs": [round(x) for x in rates[2]], "baseline_runs": [round(x) for x in rates[1]],
                  "estimate": f"N machines, one worker node each: about N × {round(one):,} msg/s "
                              "(each node drains only its own shards; they share only reference-table reads)"})


def main():
    global DB, HTTP_PORT, LISTEN_PORT, LISTEN_URL, INBOUND_PORT, LMTP_SINK_PORT, SUBMISSION_PORT
    os.makedirs(DIR, exist_ok=True)
    HTTP_PORT = free_port(HTTP_PORT)
    LISTEN_PORT = free_port(LISTEN_PORT)
    INBOUND_PORT = free_port(INBOUND_PORT)
    LMTP_SINK_PORT = free_port(LMTP_SINK_PORT)
    SUBMISSION_PORT = free_port(SUBMISSION_PORT)
    LISTEN_URL = f"http://127.0.0.1:{LISTEN_PORT}"
    start_cluster()
    nginx = None
    sink = None
    try:
        DB = connect()
        sql("CREATE EXTENSION pg_email")
        sql("CREATE SCHEMA bench")
        sql("CREATE TABLE bench.plain (LIKE email.messages INCLUDING DEFAULTS INCLUDING INDEXES INCLUDING IDENTITY)")
        sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "postfix", f"127.0.0.1:{SINK_PORT}", "4096"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nginx = start_nginx()
        sql(f"SELECT email.add_transport('sink', 'smtp://127.0.0.1:{SINK_PORT}?tls=none&max_connections=8')")
        sql(f"SELECT email.add_transport('http', 'resend+api://k@127.0.0.1:{HTTP_PORT}?scheme=http&max_connections=32')")
        sql(f"SELECT email.add_transport('lat', 'smtp://127.0.0.1:{LAT_PORT}?tls=none')")
        sql("SELECT email.add_transport('cap', 'capture://')")
        # The same two with the transports' own defaults (rows 23 and 24).
        sql(f"SELECT email.add_transport('sink_defaults', 'smtp://127.0.0.1:{SINK_PORT}?tls=none')")
        sql(f"SELECT email.add_transport('http_defaults', 'resend+api://k@127.0.0.1:{HTTP_PORT}?scheme=http')")
        only = set(sys.argv[1:])
        for n, fn in enumerate([bench_enqueue, bench_bulk, bench_smtp_drain, bench_http_drain, bench_latency,
                                bench_queue_size, bench_rss, bench_templates, bench_pixel, bench_webhooks,
                                bench_inbound, bench_verp, bench_topic, bench_dkim,
                                bench_dkim_ed25519, bench_outbound, bench_stats, bench_send_api,
                                bench_submission, bench_insert, bench_insert_bulk, None, bench_defaults, None,
                                bench_flat, bench_citus], 1):
            if fn and (not only or str(n) in only):
                fn()
    finally:
        if sink:
            sink.terminate()
        if nginx:
            subprocess.run(nginx + ["-s", "stop"], capture_output=True)
        subprocess.run(["bash", os.path.join(ROOT, "scripts/cluster.sh"), "stop", DIR])
    machine = f"{platform.node()}: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB, {platform.platform()}"
    print(f"\npg_email bench — {time.strftime('%Y-%m-%d %H:%M')} — {machine}\n")
    print("| # | figure | value | same-run baseline | ratio | target | met |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        value = r.get("value_text") or f"{r['value']:,} {r['unit']}"
        base = f"{r['baseline']:,}" if r["baseline"] is not None else "—"
        ratio = r["ratio"] if r["ratio"] is not None else "—"
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        print(f"| {r['n']} | {r['figure']} | {value} | {base} | {ratio} | {r['target']} | {met} |")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", time.strftime("%Y%m%d-%H%M%S") + ".json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, f, indent=2)
    print(f"\nwritten to {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
