"""Scale-out on Citus: a 3-node cluster on this machine (a coordinator without shards and two
worker nodes, each with pg_email's workers preloaded), the outbox distributed by
email.distribute(). Mail queued on any node inside the application's own distributed
transaction is delivered by the worker of the node holding its shard, exactly once (but for the
messages in flight at a crash of that node's worker), to a real smtp-sink.

Skipped, saying why, when Citus is not installed (scripts/citus.sh builds it from the vendored
source; `make test` runs that first)."""
import collections
import os
import signal
import subprocess
import threading
import time
import uuid

import psycopg2
import pytest

from conftest import E2E_DIR, PORT, ROOT, SLOW, Db, wait_until
from servers import SmtpSink
from test_outbound_webhooks import Receiver

CITUS_SH = os.path.join(ROOT, "scripts", "citus-cluster.sh")
BASE = PORT + 40  # coordinator; worker nodes on BASE + 1 and BASE + 2
NODES = (BASE, BASE + 1, BASE + 2)
DIR = os.path.join(E2E_DIR, "citus")
SINK_PORT = 26710
CONF = [
    "pg_email.workers = 2",
    "pg_email.poll_interval = '250ms'",
    "pg_email.lease = '20s'",
    "pg_email.retry_base = '1s'",
    "pg_email.default_sender = 'citus tests <tests@example.org>'",
    "pg_email.webhook_allow_hosts = '127.0.0.1'",
]

pytestmark = pytest.mark.skipif(
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "citus.sh"), "--check"]).returncode != 0,
    reason="Citus is not installed: scripts/citus.sh builds it from ../shared/vendor (make test runs it)")


def node(port, user="postgres"):
    c = psycopg2.connect(host="127.0.0.1", port=port, dbname="app", user=user)
    c.autocommit = True
    return Db(c)


@pytest.fixture(scope="module")
def citus():
    subprocess.run(["bash", CITUS_SH, "start", DIR, str(BASE), "app", *CONF], check=True)
    sink = SmtpSink(SINK_PORT, os.path.join(DIR, "sink"))
    sink.start()
    try:
        coord = node(BASE)
        coord.all("CREATE EXTENSION pg_email")
        # Mail queued before distributing is kept and delivered afterwards.
        coord.all("SELECT email.add_transport('cap', 'capture://', is_default => true)")
        early = coord.val("SELECT email.send(recipients => 'early@x.test', subject => 'queued before distribute', "
                          "body => 'b', send_at => now() + interval '2 seconds')")
        assert coord.val("SELECT email.distribute()") == "distributed: email.messages in 32 shards on 2 worker nodes"
        coord.all("SELECT email.add_transport('sink', %s)", f"smtp://127.0.0.1:{SINK_PORT}?tls=none&max_connections=8")
        yield {"coord": coord, "sink": sink, "early": early}
    finally:
        sink.stop()
        subprocess.run(["bash", CITUS_SH, "stop", DIR], check=False)


def placement_counts(db, table, where="true"):
    """{node port: rows of table (matching where) on that node's shards}."""
    rows = db.all("SELECT nodeport, sum(result::bigint) FROM run_command_on_placements(%s, %s) GROUP BY 1",
                  table, f"SELECT count(*) FROM %s WHERE {where}")
    return {p: int(n) for p, n in rows}


def node_of(db, mid):
    """The port of the node holding message mid's shard."""
    return db.val("""SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid)
                     WHERE p.shardid = get_shard_id_for_distribution_column('email.messages', %s)""", mid)


def queue_to_sink(db, tag, n, body_bytes):
    """Queues n messages tagged `tag` to smtp-sink (one recipient each, a body of body_bytes)."""
    db.all("SELECT count(email.send(recipients => %s || i || '@x.test', subject => %s || ' ' || i, "
           "body => repeat('x', %s), transport => 'sink', tags => ARRAY[%s])) FROM generate_series(1, %s) i",
           tag, tag, body_bytes, tag, n)


def wait_sent(db, ids, timeout=SLOW):
    q = "SELECT count(*) FROM email.messages WHERE id = ANY(%s) AND status = 'sent'"
    wait_until(lambda: db.val(q, list(ids)) == len(ids), f"{len(ids)} messages sent", timeout)


def test_distribute_kept_the_queued_mail_and_refuses_what_it_cannot_do(citus):
    coord = citus["coord"]
    wait_sent(coord, [citus["early"]])
    assert coord.val("SELECT count(*) FROM email.captured WHERE message_id = %s", citus["early"]) == 1
    assert coord.val("SELECT email.distribute()") == "already distributed"
    code, msg = node(BASE + 1).error("SELECT email.distribute()")
    assert code == "0A000" and "coordinator" in msg
    code, msg = coord.error("SELECT email.distribute(0)")
    assert code == "22023" and "shard_count" in msg
    kinds = dict(coord.all("SELECT logicalrelid::text, partmethod::text FROM pg_dist_partition "
                           "WHERE logicalrelid::text LIKE 'email.%%'"))
    assert {t: kinds.get(t) for t in ("email.messages", "email.receipts", "email.attachments", "email.captured")} == \
        dict.fromkeys(("email.messages", "email.receipts", "email.attachments", "email.captured"), "h")
    for t in ("email.transports", "email.transport_secrets", "email.suppressions", "email.templates",
              "email.template_versions", "email.topics", "email.subscriptions"):
        assert kinds.get(t) == "n", t


@pytest.mark.parametrize("port", [BASE, BASE + 1], ids=["coordinator", "worker-node"])
def test_mail_commits_and_rolls_back_with_the_application_rows(citus, port):
    """email.send inside a transaction that also writes a distributed application table."""
    coord = citus["coord"]
    if not coord.val("SELECT to_regclass('public.orders') IS NOT NULL"):
        coord.all("CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL)")
        coord.all("SELECT create_distributed_table('orders', 'id')")
    db = node(port)
    db.conn.autocommit = False
    base = port * 1000
    for oid, end in ((base + 1, "commit"), (base + 2, "rollback")):
        db.all("INSERT INTO orders VALUES (%s, 'ada@x.test')", oid)
        mid = db.val("SELECT email.send(recipients => 'ada@x.test', subject => %s, body => 'thanks')", f"order {oid}")
        getattr(db.conn, end)()
        if end == "commit":
            wait_sent(coord, [mid])
            assert coord.val("SELECT count(*) FROM email.captured WHERE message_id = %s", mid) == 1
            assert coord.val("SELECT count(*) FROM orders WHERE id = %s", oid) == 1
        else:
            assert coord.val("SELECT count(*) FROM email.messages WHERE subject = %s", f"order {oid}") == 0
            assert coord.val("SELECT count(*) FROM orders WHERE id = %s", oid) == 0
    db.conn.close()


def test_a_trigger_on_a_distributed_table_queues_mail(citus):
    coord = citus["coord"]
    coord.all("CREATE TABLE signups (id bigint PRIMARY KEY, address text NOT NULL)")
    coord.all("SELECT create_distributed_table('signups', 'id')")
    coord.all("""CREATE FUNCTION welcome() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN PERFORM email.send(recipients => NEW.address, subject => 'welcome ' || NEW.id, body => 'hi');
                 RETURN NEW; END $$""")
    coord.all("SET citus.enable_unsafe_triggers = on")
    coord.all("CREATE TRIGGER signups_welcome AFTER INSERT ON signups FOR EACH ROW EXECUTE FUNCTION welcome()")
    coord.all("RESET citus.enable_unsafe_triggers")
    coord.all("INSERT INTO signups SELECT i, 'u' || i || '@x.test' FROM generate_series(1, 20) i")
    ids = [r[0] for r in coord.all("SELECT id FROM email.messages WHERE subject LIKE 'welcome %%'")]
    assert len(ids) == 20
    wait_sent(coord, ids)


def test_twenty_thousand_messages_are_sent_once_each_by_both_worker_nodes(citus):
    coord, sink = citus["coord"], citus["sink"]
    tag = f"bulk-{uuid.uuid4().hex[:6]}"
    total = 20000
    queue_to_sink(coord, tag, total, 500)
    q = "SELECT count(*) FROM email.messages WHERE %s = ANY(tags) AND status = 'sent'"
    wait_until(lambda: coord.val(q, tag) == total, f"{total} messages sent", timeout=300)
    ids = dict(coord.all("SELECT message_id, id FROM email.messages WHERE %s = ANY(tags)", tag))
    copies = collections.Counter(m for m in sink.message_ids() if m in ids)
    assert len(copies) == total and set(copies.values()) == {1}, collections.Counter(copies.values())
    # Each worker node sent its own shards' share: its receipts, and its workers' counters
    # (email.worker_status() lists every node's workers, on any node).
    for port in NODES:
        rows = node(port).all("SELECT node, sum(sent) FROM email.worker_status() WHERE kind = 'delivery' GROUP BY 1")
        per_node = {int(n.rsplit(":", 1)[1]): int(v) for n, v in rows}
        assert set(per_node) == set(NODES), rows
    receipts = placement_counts(coord, "email.receipts", "event = 'sent'")
    assert set(receipts) == set(NODES[1:]), receipts
    for port in NODES[1:]:
        assert per_node[port] >= total // 4, per_node
        assert receipts[port] >= total // 4, receipts
    assert sum(receipts.values()) >= total
    assert per_node[BASE] == 0, per_node


def test_kill_9_of_one_nodes_worker_loses_nothing_and_repeats_only_its_in_flight_mail(citus):
    coord, sink = citus["coord"], citus["sink"]
    tag = f"crash-{uuid.uuid4().hex[:6]}"
    total = 6000
    queue_to_sink(coord, tag, total, 2000)
    victim = node(BASE + 1)
    q = "SELECT count(*) FROM email.messages WHERE %s = ANY(tags) AND status = 'sent'"
    wait_until(lambda: coord.val(q, tag) >= total // 4, "a quarter sent before the crash")
    pids = [r[0] for r in victim.all("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_email worker'")]
    assert pids
    for p in pids:
        os.kill(p, signal.SIGKILL)

    def all_sent():
        try:
            return coord.val(q, tag) == total
        except psycopg2.Error:
            return False
    wait_until(all_sent, f"all {total} sent after the crash", timeout=300)
    rows = coord.all("""SELECT m.id, m.message_id,
                               m.attempts - (SELECT count(DISTINCT r.attempt) FROM email.receipts r
                                             WHERE r.message_id = m.id AND r.attempt IS NOT NULL)
                        FROM email.messages m WHERE %s = ANY(m.tags)""", tag)
    time.sleep(1.0)
    copies = collections.Counter(sink.message_ids())
    missing = [m for _, m, _ in rows if copies[m] == 0]
    assert not missing, f"{len(missing)} never reached the sink"
    # More than one copy only for a claim the crash cut short (no receipt for that attempt).
    over = [(i, m, copies[m], c) for i, m, c in rows if copies[m] > 1 + c]
    assert not over, over[:5]
    repeated = [i for i, m, _ in rows if copies[m] > 1]
    victim_port = BASE + 1
    assert all(node_of(coord, i) == victim_port for i in repeated), "a message of the other node was sent twice"
    assert len(repeated) <= 2 * 64, len(repeated)


def test_an_idempotency_key_holds_across_the_nodes(citus):
    coord = citus["coord"]
    key = f"order-{uuid.uuid4().hex[:8]}"
    call = "SELECT email.send(recipients => 'k@x.test', subject => %s, body => 'b', idempotency_key => %s)"
    first = coord.val(call, "paid", key)
    for port in NODES:
        assert node(port).val(call, "paid", key) == first, port
    code, msg = node(BASE + 2).error(call, "refunded", key)
    assert code == "22023" and "idempotency_key" in msg
    assert coord.val("SELECT count(*) FROM email.messages WHERE idempotency_key = %s", key) == 1
    wait_sent(coord, [first])
    # Two sessions on two nodes with one new key: the second waits for the first, then gets its id.
    key2 = f"race-{uuid.uuid4().hex[:8]}"
    a, b = node(BASE + 1), node(BASE + 2)
    a.conn.autocommit = False
    ida = a.val(call, "x", key2)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("b", b.val(call, "x", key2)))
    t.start()
    time.sleep(0.5)
    assert t.is_alive(), "the second session did not wait for the first"
    a.conn.commit()
    t.join(30)
    assert got["b"] == ida


def test_suppressions_and_topics_apply_on_every_node(citus):
    coord = citus["coord"]
    coord.all("SELECT email.suppress('gone@x.test')")
    coord.all("INSERT INTO email.topics (name, description, default_subscribed) VALUES ('news', 'News', true)")
    coord.all("SELECT email.unsubscribe('left@x.test', 'news')")
    for port in NODES:
        d = node(port)
        mid = d.val("SELECT email.send(recipients => 'Gone@X.test', subject => 's', body => 'b')")
        assert d.val("SELECT status::text FROM email.messages WHERE id = %s", mid) == "suppressed", port
        assert d.val("SELECT event FROM email.receipts WHERE message_id = %s", mid) == "suppressed"
        mid = d.val("SELECT email.send(recipients => 'left@x.test', subject => 'n', body => 'b', topic => 'news')")
        assert d.val("SELECT status::text FROM email.messages WHERE id = %s", mid) == "suppressed", port
        mid = d.val("SELECT email.send(recipients => 'stay@x.test', subject => 'n', body => 'b', topic => 'news')")
        wait_sent(coord, [mid])


def test_templates_are_saved_by_insert_and_pinned_on_every_node(citus):
    coord = citus["coord"]
    coord.all("INSERT INTO email.templates (name, subject, body) VALUES ('layout', '{% block s %}{% endblock %}', 'L')")
    coord.all("INSERT INTO email.templates (name, subject, body) VALUES "
              "('hello', '{% extends \"layout\" %}{% block s %}Hello v1 {{ name }}{% endblock %}', 'b')")
    for port in NODES:
        assert node(port).all("SELECT version FROM email.template_versions WHERE name = 'hello'") == [(1,)], port
    later = node(BASE + 2).val("SELECT email.send_template('hello', 'p@x.test', '{\"name\": \"Ada\"}', "
                               "send_at => now() + interval '3 seconds')")
    coord.all("UPDATE email.templates SET subject = '{% extends \"layout\" %}{% block s %}Hello v2 {{ name }}{% endblock %}' "
              "WHERE name = 'hello'")
    for port in NODES:
        assert node(port).all("SELECT version FROM email.template_versions WHERE name = 'hello' ORDER BY 1") == \
            [(1,), (2,)], port
    now = node(BASE + 1).val("SELECT email.send_template('hello', 'q@x.test', '{\"name\": \"Bob\"}')")
    wait_sent(coord, [later, now])
    assert coord.val("SELECT subject FROM email.messages WHERE id = %s", later) == "Hello v1 Ada"
    assert coord.val("SELECT subject FROM email.messages WHERE id = %s", now) == "Hello v2 Bob"
    code, _ = coord.error("DELETE FROM email.templates WHERE name = 'layout'")
    assert code == "2BP01"
    coord.all("DELETE FROM email.templates WHERE name IN ('hello', 'layout')")
    for port in NODES:
        assert node(port).val("SELECT count(*) FROM email.templates WHERE name IN ('hello', 'layout')") == 0


def test_each_role_sees_only_its_own_mail_on_every_node(citus):
    coord = citus["coord"]
    for r in ("citus_a", "citus_b"):
        coord.all(f"DROP ROLE IF EXISTS {r}")
        coord.all(f"CREATE ROLE {r} LOGIN")
        coord.all("SELECT email.grant_send(%s)", r)
    mine = {}
    for r, port in (("citus_a", BASE + 1), ("citus_b", BASE + 2)):
        d = node(port, user=r)
        mine[r] = d.val("SELECT email.send(recipients => %s, subject => 'rls', body => 'b', sender => 's@x.test', "
                        "attachments => '[{\"filename\": \"a.txt\", \"content\": \"aGk=\"}]')", f"{r}@x.test")
    wait_sent(coord, list(mine.values()))
    for r in mine:
        for port in NODES:
            d = node(port, user=r)
            assert d.all("SELECT id FROM email.messages") == [(mine[r],)], (r, port)
            assert {m for (m,) in d.all("SELECT DISTINCT message_id FROM email.receipts")} == {mine[r]}, (r, port)
            assert d.all("SELECT message_id FROM email.attachments") == [(mine[r],)], (r, port)
            code, _ = d.error("INSERT INTO email.messages (recipients, subject, body, created_by) "
                              "VALUES ('{x@x.test}', 's', 'b', 'postgres')")
            assert code == "42501", (r, port)
    coord.all("SELECT email.revoke_send('citus_b')")
    code, _ = node(BASE + 1, user="citus_b").error("SELECT email.send(recipients => 'x@x.test', subject => 's', body => 'b')")
    assert code == "42501"


def test_outbound_webhooks_are_posted_by_the_node_of_each_receipt(citus):
    coord = citus["coord"]
    rx = Receiver().start()
    try:
        rx.secret = coord.val("SELECT email.add_webhook('citus_hook', %s, ARRAY['sent'])", rx.url)
        ids = [node(p).val("SELECT email.send(recipients => 'w@x.test', subject => 'hook', body => 'b')") for p in NODES]
        wait_sent(coord, ids)
        wait_until(lambda: {r.data.get("message_id") for r in rx.requests if r.payload} >= set(ids),
                   "a signed delivery of each message's 'sent' event")
        assert not rx.errors(), rx.errors()
        # Each delivery was queued and posted on the node holding its receipt.
        for mid in ids:
            port = node_of(coord, mid)
            assert node(port).val("SELECT status FROM email.webhook_deliveries d JOIN email.receipts r "
                                  "ON r.id = d.receipt_id WHERE r.message_id = %s", mid) == "sent", (mid, port)
        # A 410 from a worker node's post disables the webhook on every node.
        rx.mode = "410"
        node(BASE + 1).val("SELECT email.send(recipients => 'w@x.test', subject => 'gone', body => 'b')")
        wait_until(lambda: all(node(p).val("SELECT NOT enabled FROM email.webhooks WHERE name = 'citus_hook'")
                               for p in NODES), "the webhook disabled on every node")
    finally:
        rx.stop()
        coord.all("SELECT email.remove_webhook('citus_hook')")


@pytest.mark.parametrize("port", [BASE, BASE + 1], ids=["coordinator", "worker-node"])
def test_insert_into_the_outbox_queues_with_the_rules_of_email_send(citus, port):
    """INSERT INTO email.messages by the outbox's owner on a distributed outbox: checked and filled
    on the row's shard as email.send does it, suppressed recipients dropped with their receipts,
    templates rendered and pinned, topics applied; an idempotency key is refused (its id would
    have to come from the key), and so is a role's INSERT (README). A refused statement stores
    nothing."""
    coord, db = citus["coord"], node(port)
    tag = f"ins-{port}"
    coord.all("INSERT INTO email.suppressions (address, reason) VALUES ('ins-gone@x.test', 'bounced') "
              "ON CONFLICT DO NOTHING")
    coord.all("INSERT INTO email.templates (name, subject, body) VALUES ('ins_tpl', 'Hi {{ n }}', 'Body {{ n }}') "
              "ON CONFLICT (name) DO NOTHING")
    if not coord.val("SELECT count(*) FROM email.topics WHERE name = 'ins_news'"):
        coord.all("INSERT INTO email.topics (name, default_subscribed) VALUES ('ins_news', false)")
        coord.all("SELECT email.subscribe('ins-in@x.test', 'ins_news')")
    if not coord.val("SELECT count(*) FROM pg_roles WHERE rolname = 'citus_ins'"):
        coord.all("CREATE ROLE citus_ins LOGIN")
        coord.all("SELECT email.grant_send('citus_ins')")
    db.all("INSERT INTO email.messages (recipients, subject, body, transport, tags) "
           "SELECT ARRAY['ins' || i || '@x.test', CASE WHEN i %% 10 = 0 THEN 'INS-GONE@x.test' ELSE 'ins-b' || i || '@x.test' END], "
           "%s || ' ' || i, 'b', 'sink', ARRAY[%s] FROM generate_series(1, 300) i", tag, tag)
    tpl = db.val("INSERT INTO email.messages (recipients, template, data, transport, tags) "
                 "VALUES ('{t@x.test}', 'ins_tpl', '{\"n\": 7}', 'sink', ARRAY[%s]) RETURNING id", tag)
    news = db.val("INSERT INTO email.messages (recipients, subject, body, topic, transport, tags) "
                  "VALUES ('{ins-in@x.test,ins-out@x.test}', 'news', 'b', 'ins_news', 'sink', ARRAY[%s]) RETURNING id", tag)
    ids = [i for (i,) in coord.all("SELECT id FROM email.messages WHERE %s = ANY(tags)", tag)]
    assert len(ids) == 302
    wait_sent(coord, ids)
    assert coord.val("SELECT count(*) FROM email.messages WHERE id = ANY(%s) AND 'ins-gone@x.test' = ANY(recipients)",
                     ids) == 0
    assert coord.val("SELECT count(*) FROM email.receipts WHERE message_id = ANY(%s) AND event = 'suppressed' "
                     "AND recipient = 'ins-gone@x.test'", ids) == 30
    assert coord.one("SELECT subject, template_version FROM email.messages WHERE id = %s", tpl) == ("Hi 7", 1)
    assert coord.val("SELECT recipients FROM email.messages WHERE id = %s", news) == ["ins-in@x.test"]
    assert coord.all("SELECT event, recipient FROM email.receipts WHERE message_id = %s AND event = 'suppressed'",
                     news) == [("suppressed", "ins-out@x.test")]
    before = coord.val("SELECT count(*) FROM email.messages")
    for q, state, word in [("INSERT INTO email.messages (recipients, subject, body, idempotency_key) "
                            "VALUES ('{k@x.test}', 'keyed', 'b', 'ins-key')", "0A000", "idempotency_key"),
                           ("INSERT INTO email.messages (recipients, subject, body) VALUES ('{not an address}', 's', 'b')",
                            "22023", "recipients")]:
        code, msg = db.error(q)
        assert code == state and word in msg, (q, code, msg)
    code, msg = node(port, user="citus_ins").error("INSERT INTO email.messages (recipients, subject, body) "
                                                   "VALUES ('{r@x.test}', 'by a role', 'b')")
    assert code in ("0A000", "42501"), (code, msg)
    assert coord.val("SELECT count(*) FROM email.messages") == before


def test_forget_is_refused_on_a_distributed_outbox_and_changes_nothing(citus):
    coord = citus["coord"]
    mid = coord.val("SELECT email.send(recipients => 'forget-me@x.test', subject => 'keep', body => 'b', "
                    "transport => 'sink')")
    wait_sent(coord, [mid])
    code, msg = coord.error("SELECT * FROM email.forget('forget-me@x.test')")
    assert code == "0A000" and "email.forget" in msg, (code, msg)
    assert coord.one("SELECT recipients, subject FROM email.messages WHERE id = %s", mid) == (["forget-me@x.test"], "keep")
