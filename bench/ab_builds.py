"""A/B of builds of pg_email.so on the drain at default settings: BUILDS="a b" names files
/var/tmp/so/<name>.so, swapped into the server between drains (order alternating), with the
drain rate and the CPU of the worker's main thread per message. T=http_defaults drains through
resend+api to nginx instead of smtp-sink. Uses bench.py's cluster and helpers; run as root:
    BUILDS="before after" REPS=4 python3 bench/ab_builds.py"""
import os, sys, subprocess, time, statistics, shutil
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as b
N = int(os.environ.get("N", "50000"))
SOS = os.environ.get("BUILDS", "before after").split()
LIB = "/usr/lib/postgresql/15/lib/pg_email.so"
TRANSPORT = os.environ.get("T", "sink_defaults")
os.makedirs(b.DIR, exist_ok=True)
b.HTTP_PORT = b.free_port(b.HTTP_PORT)
b.start_cluster()
sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "postfix", f"127.0.0.1:{b.SINK_PORT}", "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
nginx = b.start_nginx() if TRANSPORT == "http_defaults" else None
res = {s: [] for s in SOS}
cpus = {}
try:
    b.DB = b.connect()
    b.sql("CREATE EXTENSION pg_email"); b.sql("CREATE SCHEMA bench"); b.sql("CREATE TABLE bench.plain (x int)")
    b.sql(f"SELECT email.add_transport('sink_defaults', 'smtp://127.0.0.1:{b.SINK_PORT}?tls=none')")
    b.sql(f"SELECT email.add_transport('http_defaults', 'resend+api://k@127.0.0.1:{b.HTTP_PORT}?scheme=http')")
    b.restart_with(workers=1, max_in_flight=64, batch_size=200)
    for rep in range(int(os.environ.get("REPS", "3"))):
        order = SOS if rep % 2 == 0 else SOS[::-1]
        for so in order:
            shutil.copy(f"/var/tmp/so/{so}.so", LIB + ".new"); os.rename(LIB + ".new", LIB)
            b.restart_with()
            b.reset(); b.enqueue(N, TRANSPORT)
            pid = b.val("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_email worker' LIMIT 1")
            def cpu(path):
                f = open(path).read().rsplit(")", 1)[1].split()
                return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
            m0, p0 = cpu(f"/proc/{pid}/task/{pid}/stat"), cpu(f"/proc/{pid}/stat")
            r = N / b.drain(N)
            m1, p1 = cpu(f"/proc/{pid}/task/{pid}/stat"), cpu(f"/proc/{pid}/stat")
            b.wait_idle()
            res[so].append(r); cpus.setdefault(so, []).append((m1 - m0) / N * 1e6)
            print(f"{so} {r:.0f} msg/s, main thread {(m1-m0)/N*1e6:.0f} us/msg, process {(p1-p0)/N*1e6:.0f} us/msg", flush=True)
    for so in SOS:
        print(so, "median", round(statistics.median(res[so])), [round(x) for x in res[so]], "main us/msg", round(statistics.median(cpus[so])), [round(x) for x in cpus[so]])
finally:
    shutil.copy(f"/var/tmp/so/{SOS[-1]}.so", LIB + ".new"); os.rename(LIB + ".new", LIB)
    sink.terminate()
    if nginx: subprocess.run(nginx + ["-s", "stop"], capture_output=True)
    subprocess.run(["bash", os.path.join(b.ROOT, "scripts/cluster.sh"), "stop", b.DIR])
