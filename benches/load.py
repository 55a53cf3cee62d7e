#!/usr/bin/env python3
"""Load benchmark for mesh-proxy against the same upstream reached directly, through HAProxy
and through nginx, all measured in one run (STYLE habit 13: ratios against a baseline measured
in the same run).

Every server (upstream and subject) is pinned to one core, every load generator to another.
For each scenario: maximum throughput (wrk, 32 connections, one thread), latency at fixed rates
with coordinated-omission correction (oha -q RATE --latency-correction), idle RSS and peak RSS
(VmHWM), CPU microseconds per request from /proc/PID/stat.

Python 3 standard library only. Started by benches/run.sh; usable alone:
    python3 benches/load.py [--quick] [--only direct,mesh-1hop] [--proxy-bin PATH]
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import ssl
import socket
import subprocess
import sys
import tempfile
import time

BODY = ("mesh-bench-" + "x" * 88 + "\n")  # exactly 100 bytes
assert len(BODY) == 100

SERVER_CORE = "1"
LOADGEN_CORE = "0"
CONNS = 32
RATES = (2000, 5000)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# Targets from the issue, checked against the one-hop row.
TARGET_ADDED_P99_MS_2K = 0.1
TARGET_THROUGHPUT_RATIO = 1.1
TARGET_CPU_US = 15.0
TARGET_RSS_IDLE_MIB = 8.0
TARGET_RSS_LOAD_MIB = 20.0

ALL_SCENARIOS = ["direct", "mesh-1hop", "mesh-1hop-nolog", "mesh-2hop-h1", "mesh-2hop-h2",
                 "mesh-2hop-mtls", "haproxy", "nginx-proxy", "mesh-1hop-h2up", "haproxy-h2up"]
MESH_SCENARIOS = {"mesh-1hop", "mesh-1hop-nolog", "mesh-2hop-h1", "mesh-2hop-h2",
                  "mesh-2hop-mtls", "mesh-1hop-h2up"}

# Issue 13: two hops over mTLS against the same two hops in plaintext h2c, one run.
TARGET_MTLS_CPU_RATIO = 1.25


def log(msg):
    print(f"[load] {msg}", file=sys.stderr, flush=True)


def free_port():
    """A port the kernel had free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# === Processes ===


class Procs:
    """Every process this driver starts, killed by PID at the end. PIDs are also appended to
    a file so that run.sh's trap can kill them if this driver itself is killed."""

    def __init__(self, pidfile):
        self.procs = []
        self.pidfile = pidfile

    def start(self, name, argv, stdout_path, core):
        argv = ["taskset", "-c", core] + argv
        out = open(stdout_path, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        p.bench_name = name
        p.bench_log = stdout_path
        self.procs.append(p)
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{p.pid}\n")
        return p

    def stop(self, p):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p)


def proc_cpu_ticks(pid):
    """(utime, stime) of all threads of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm may contain spaces; fields after the closing parenthesis start at field 3.
    rest = data[data.rindex(")") + 2:].split()
    return int(rest[11]), int(rest[12])


def core_busy_ticks(core):
    """(busy, total) ticks of one core since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]  # idle + iowait
                return sum(v[:8]) - idle, sum(v[:8])
    raise KeyError(core)


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def smaps_kib(pid):
    """(anonymous, file-backed) KiB of the resident set, from /proc/PID/smaps_rollup."""
    v = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("Rss:", "Anonymous:"):
                v[parts[0]] = int(parts[1])
    return v["Anonymous:"], v["Rss:"] - v["Anonymous:"]


def http_get(port, path="/", host=None, timeout=1.0, ca=None):
    if ca is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        ctx = ssl.create_default_context(cafile=ca)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    try:
        headers = {"Host": host} if host else {}
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        return r.status, body
    finally:
        conn.close()


def wait_ready(proc, port, path="/", host=None, expect_body=None, timeout=10.0, ca=None):
    """Poll until GET returns 200 (bounded); fail with the process's log if it does not."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            status, body = http_get(port, path, host, ca=ca)
            if status == 200 and (expect_body is None or body == expect_body):
                return
            last = f"status {status}, body {body[:120]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.05)
    tail = ""
    try:
        with open(proc.bench_log, "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")
    except OSError:
        pass
    state = f"exited with {proc.returncode}" if proc.poll() is not None else "still running"
    raise RuntimeError(f"{proc.bench_name} not ready on :{port}{path} within {timeout}s "
                       f"({state}; last: {last}); log tail:\n{tail}")


# === Servers ===


def nginx_conf(tmp, name, server_block):
    """A one-process nginx (master_process off, so the process we measure is the one that
    serves), no access log, long keep-alive."""
    prefix = os.path.join(tmp, name)
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = f"""
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
{server_block}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return prefix, path


def start_upstream(procs, tmp, port, h2_port):
    """The one upstream: HTTP/1.1 on `port`, HTTP/2 with prior knowledge (h2c) on `h2_port`."""
    block = f"""
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        listen 127.0.0.1:{h2_port} http2 backlog=4096;
        default_type text/plain;
        location / {{ return 200 "{BODY[:-1]}\\n"; }}
    }}"""
    prefix, conf = nginx_conf(tmp, "upstream", block)
    p = procs.start("upstream-nginx", ["nginx", "-p", prefix, "-c", conf],
                    os.path.join(tmp, "upstream.out"), SERVER_CORE)
    wait_ready(p, port, expect_body=BODY.encode())
    return p


def start_nginx_proxy(procs, tmp, port, upstream_port):
    block = f"""
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering on;
        }}
    }}"""
    prefix, conf = nginx_conf(tmp, "nginx-proxy", block)
    p = procs.start("nginx-proxy", ["nginx", "-p", prefix, "-c", conf],
                    os.path.join(tmp, "nginx-proxy.out"), SERVER_CORE)
    wait_ready(p, port, host="upstream", expect_body=BODY.encode())
    return [p]


def start_haproxy(procs, tmp, port, upstream_port, h2=False):
    proto = " proto h2" if h2 else ""
    cfg = f"""
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 75s
    option http-keep-alive
    http-reuse always

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server up 127.0.0.1:{upstream_port} pool-max-conn 64{proto}
"""
    path = os.path.join(tmp, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(cfg)
    p = procs.start("haproxy", ["haproxy", "-db", "-f", path],
                    os.path.join(tmp, "haproxy.out"), SERVER_CORE)
    wait_ready(p, port, host="upstream", expect_body=BODY.encode())
    return [p]


def write_mesh_config(tmp, agent, outbound, admin, snapshot_services, inbound=None,
                      inbound_app=None, access_log=True, control=None):
    snap_path = os.path.join(tmp, f"{agent}-snapshot.toml")
    lines = ["version = 1", ""]
    for name, protocol, endpoints in snapshot_services:
        eps = ", ".join(f'"127.0.0.1:{p}"' for p in endpoints)
        lines += ["[[services]]", f'name = "{name}"', f'protocol = "{protocol}"',
                  f"endpoints = [{eps}]", ""]
    with open(snap_path, "w") as f:
        f.write("\n".join(lines))
    boot = [f'agent = "{agent}"', 'phase = "critical"', "", "[listen]",
            f'outbound = "127.0.0.1:{outbound}"']
    if inbound is not None:
        boot.append(f'inbound = "127.0.0.1:{inbound}"')
    boot += [f'admin = "127.0.0.1:{admin}"', ""]
    if inbound is not None:
        boot += ["[inbound]", f'app = "127.0.0.1:{inbound_app}"', "max_concurrency = 10000",
                 "queue_depth = 10000", 'queue_timeout = "1s"', ""]
    boot += ["[snapshot]", f'file = "{snap_path}"', "", "[runtime]", "worker_threads = 1", "",
             "[drain]", 'grace = "1s"', "", "[log]", f"access = {'true' if access_log else 'false'}",
             ""]
    if control is not None:
        # Snapshots and the certificate from the control process; the file above is only the
        # first snapshot.
        boot += ["[control]", f'address = "{control.address}"', 'wait = "5s"',
                 'max_backoff = "100ms"', f'ca_file = "{control.ca_file}"', "", "[identity]",
                 f'token_file = "{control.token_file(agent)}"', ""]
    path = os.path.join(tmp, f"{agent}-bootstrap.toml")
    with open(path, "w") as f:
        f.write("\n".join(boot))
    return path


def start_mesh(procs, tmp, proxy_bin, agent, outbound, admin, services, inbound=None,
               inbound_app=None, access_log=True, control=None):
    cfg = write_mesh_config(tmp, agent, outbound, admin, services, inbound, inbound_app,
                            access_log, control)
    # stdout carries one JSON access-log line per request: to a file, never an undrained pipe.
    p = procs.start(agent, [proxy_bin, "--config", cfg], os.path.join(tmp, f"{agent}.out"),
                    SERVER_CORE)
    wait_ready(p, admin, path="/ready")
    return p


def start_mesh_1hop(procs, tmp, proxy_bin, port, upstream_port, access_log=True,
                    protocol="http1"):
    p = start_mesh(procs, tmp, proxy_bin, "bench-client", port, free_port(),
                   [("upstream", protocol, [upstream_port])], access_log=access_log)
    wait_ready(p, port, host="upstream", expect_body=BODY.encode())
    return [p]


def start_mesh_2hop(procs, tmp, proxy_bin, port, upstream_port, protocol):
    """agent -> sidecar A (outbound) -> sidecar B (inbound) -> app."""
    b_inbound = free_port()
    b = start_mesh(procs, tmp, proxy_bin, "bench-server", free_port(), free_port(), [],
                   inbound=b_inbound, inbound_app=upstream_port)
    a = start_mesh(procs, tmp, proxy_bin, "bench-client", port, free_port(),
                   [("upstream", protocol, [b_inbound])])
    wait_ready(a, port, host="upstream", expect_body=BODY.encode())
    return [a, b]


# === Mesh identity (mTLS) ===


def openssl(*argv):
    subprocess.run(["openssl", *argv], check=True, capture_output=True)


class MeshCa:
    """A CA of our own (P-256, made with openssl) that mesh-control signs with
    (--ca-cert/--ca-key), so that a bench client can hold a certificate of the same mesh."""

    def __init__(self, tmp, trust_domain="mesh"):
        self.dir = os.path.join(tmp, "ca")
        os.makedirs(self.dir, exist_ok=True)
        self.cert = os.path.join(self.dir, "ca.pem")
        self.key = os.path.join(self.dir, "ca-key.pem")
        self.trust_domain = trust_domain
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", self.key)
        openssl("req", "-x509", "-new", "-key", self.key, "-out", self.cert, "-days", "2",
                "-subj", "/CN=bench mesh CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def client_cert(self, agent):
        """(cert, key) naming `agent` as the mesh does: only a spiffe:// URI SAN."""
        key = os.path.join(self.dir, f"{agent}-key.pem")
        csr = os.path.join(self.dir, f"{agent}.csr")
        cert = os.path.join(self.dir, f"{agent}.pem")
        ext = os.path.join(self.dir, f"{agent}.ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName=critical,URI:spiffe://{self.trust_domain}/agent/{agent}\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", key)
        openssl("req", "-new", "-key", key, "-out", csr, "-subj", "/")
        openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", ext)
        return cert, key


class Control:
    """mesh-control as the mesh's CA and snapshot source for the agents of one scenario:
    policy `[identity] mode` strict by default (a plaintext hop would be refused, so a 200
    through two sidecars proves mTLS), sidecars speak HTTP/2 to each other as shipped."""

    def __init__(self, procs, tmp, control_bin, ca, agents, catalog, mode="strict"):
        self.tmp = tmp
        self.address = f"127.0.0.1:{free_port()}"
        policy = os.path.join(tmp, "policy")
        os.makedirs(policy, exist_ok=True)
        with open(os.path.join(policy, "traffic.toml"), "w") as f:
            f.write('[defaults]\nprotocol = "http2"\n')
        with open(os.path.join(policy, "identity.toml"), "w") as f:
            f.write(f'[identity]\nmode = "{mode}"\n')
        tokens = os.path.join(tmp, "agent-tokens.toml")
        with open(tokens, "w") as f:
            for agent in agents:
                path = self.token_file(agent)
                token = f"bench-token-{agent}-{os.urandom(8).hex()}"
                with open(path, "w") as t:
                    t.write(token)
                f.write(f'{agent} = "{token}"\n')
        cat = os.path.join(tmp, "catalog.toml")
        with open(cat, "w") as f:
            for name, endpoints in catalog:
                eps = ", ".join(f'"127.0.0.1:{p}"' for p in endpoints)
                f.write(f'[[services]]\nname = "{name}"\nphase = "critical"\n'
                        f"endpoints = [{eps}]\n\n")
        # The control process is idle during the load (long-polls wait): on the generators'
        # core so it takes nothing from the servers' core.
        self.proc = procs.start("mesh-control", [
            control_bin, "run", "--listen", self.address, "--policy", policy,
            "--catalog", cat, "--poll", "200ms", "--agent-tokens", tokens,
            "--ca-cert", ca.cert, "--ca-key", ca.key, "--trust-domain", ca.trust_domain,
            "--cert-lifetime", "12h", "--log", "warn"],
            os.path.join(tmp, "control.out"), LOADGEN_CORE)
        # With the mesh CA the channel is TLS, under a certificate of that CA.
        self.ca_file = ca.cert
        wait_ready(self.proc, int(self.address.rsplit(":", 1)[1]), path="/health", ca=ca.cert)

    def token_file(self, agent):
        return os.path.join(self.tmp, f"{agent}.token")


def start_mesh_2hop_mtls(procs, tmp, proxy_bin, control_bin, port, upstream_port):
    """agent -> sidecar A -> HTTP/2 over mTLS -> sidecar B -> app; certificates from
    mesh-control. B is agent `upstream`: A checks that the peer names the agent it dialled."""
    b_inbound = free_port()
    ca = MeshCa(tmp)
    control = Control(procs, tmp, control_bin, ca, ["bench-client", "upstream"],
                      [("upstream", [b_inbound])])
    b_admin = free_port()
    b = start_mesh(procs, tmp, proxy_bin, "upstream", free_port(), b_admin, [],
                   inbound=b_inbound, inbound_app=upstream_port, control=control)
    a = start_mesh(procs, tmp, proxy_bin, "bench-client", port, free_port(), [],
                   control=control)
    # 200 only once A has its certificate and the strict snapshot, and B its certificate.
    wait_ready(a, port, host="upstream", expect_body=BODY.encode(), timeout=20.0)
    b.bench_admin = b_admin
    return [a, b], control


def tls_counts(admin):
    """B's inbound: (mTLS handshakes, plaintext requests), from its metrics."""
    _, body = http_get(admin, "/metrics")
    handshakes = plaintext = 0.0
    for line in body.decode().splitlines():
        if line.startswith("agent_tls_handshakes_total{") and 'side="server"' in line:
            handshakes += float(line.rsplit(" ", 1)[1])
        elif line.startswith("agent_inbound_plaintext_requests_total{"):
            plaintext += float(line.rsplit(" ", 1)[1])
    return handshakes, plaintext


# === Load generators ===


_CURRENT_LOADGEN = []


def run_loadgen(argv, check=True):
    """Run a load generator to completion; while it runs, on_signal can kill it by PID."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    _CURRENT_LOADGEN.append(p)
    try:
        out, err = p.communicate()
    finally:
        _CURRENT_LOADGEN.remove(p)
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, argv, out, err)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def kill_loadgens():
    for p in list(_CURRENT_LOADGEN):
        if p.poll() is None:
            p.kill()


def run_wrk(port, duration):
    argv = ["taskset", "-c", LOADGEN_CORE, "wrk", "-t1", f"-c{CONNS}", f"-d{duration}s",
            "--latency", "-H", "Host: upstream", f"http://127.0.0.1:{port}/"]
    out = run_loadgen(argv).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    requests = int(m.group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + \
        (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"requests": requests, "rps": rps, "errors": errors, "raw": out}


_OHA_FLAGS = None


def oha_flags():
    """JSON-output flags differ between oha versions: read them from --help once."""
    global _OHA_FLAGS
    if _OHA_FLAGS is None:
        helptext = subprocess.run(["oha", "--help"], capture_output=True, text=True).stdout
        if "--output-format" in helptext:
            _OHA_FLAGS = ["--no-tui", "--output-format", "json"]
        else:
            _OHA_FLAGS = ["--no-tui", "-j"]
    return _OHA_FLAGS


def run_oha(port, rate, duration):
    argv = ["taskset", "-c", LOADGEN_CORE, "oha", "-z", f"{duration}s", "-q", str(rate),
            "-c", str(CONNS), "--latency-correction", "-H", "Host: upstream"] + oha_flags() + \
        [f"http://127.0.0.1:{port}/"]
    res = run_loadgen(argv, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"oha failed ({res.returncode}): {res.stderr[-2000:]}")
    j = json.loads(res.stdout)
    pct = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    total = sum(codes.values())
    # oha aborts the requests still in flight when -z ends: not an error of the server.
    errs = sum(v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k)
    return {
        "rate": rate,
        "responses": total,
        "achieved_rps": j["summary"]["requestsPerSec"],
        "success_rate": j["summary"]["successRate"],
        "non_2xx": total - ok,
        "errors": errs,
        "p50_ms": pct["p50"] * 1e3,
        "p99_ms": pct["p99"] * 1e3,
        "p99_9_ms": pct["p99.9"] * 1e3,
        "max_ms": j["summary"]["slowest"] * 1e3,
    }


# === One scenario ===


def measure(name, subjects, upstream, port, args):
    """subjects: the processes whose CPU and memory we charge (the upstream for `direct`)."""
    r = {"scenario": name, "pids": [p.pid for p in subjects]}
    r["rss_idle_kib"] = [proc_status_kib(p.pid, "VmRSS") for p in subjects]
    r["rss_idle_anon_file_kib"] = [smaps_kib(p.pid) for p in subjects]
    log(f"{name}: warm-up {args.warmup}s")
    total = run_wrk(port, args.warmup)["requests"]

    before = [proc_cpu_ticks(p.pid) for p in subjects]
    up_before = proc_cpu_ticks(upstream.pid)
    core_before = core_busy_ticks(SERVER_CORE)
    gen_before = core_busy_ticks(LOADGEN_CORE)
    ru_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log(f"{name}: wrk -c{CONNS} {args.duration}s")
    w = run_wrk(port, args.duration)
    after = [proc_cpu_ticks(p.pid) for p in subjects]
    up_after = proc_cpu_ticks(upstream.pid)
    core_after = core_busy_ticks(SERVER_CORE)
    gen_after = core_busy_ticks(LOADGEN_CORE)
    ru_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_ticks = (ru_after.ru_utime + ru_after.ru_stime - ru_before.ru_utime -
                 ru_before.ru_stime) * CLK_TCK
    gen_total = max(gen_after[1] - gen_before[1], 1)
    r["loadgen_core_busy_pct"] = round(100.0 * (gen_after[0] - gen_before[0]) / gen_total, 1)
    r["loadgen_core_foreign_pct"] = round(
        max(0.0, 100.0 * (gen_after[0] - gen_before[0] - wrk_ticks) / gen_total), 1)
    # Below ~95 % the servers' core was not the limit: something waited (or the generator was).
    core_total = max(core_after[1] - core_before[1], 1)
    r["server_core_busy_pct"] = round(100.0 * (core_after[0] - core_before[0]) / core_total, 1)
    ours = sum(sum(a) - sum(b) for a, b in zip(after, before))
    if upstream not in subjects:
        ours += sum(up_after) - sum(up_before)
    # CPU on the servers' core that none of our servers used: other work on the machine.
    r["server_core_foreign_pct"] = round(
        max(0.0, 100.0 * (core_after[0] - core_before[0] - ours) / core_total), 1)
    us_per_tick = 1e6 / CLK_TCK
    n = w["requests"]
    r["wrk"] = {k: v for k, v in w.items() if k != "raw"}
    r["cpu_user_us_per_req_each"] = [(a[0] - b[0]) * us_per_tick / n for a, b in zip(after, before)]
    r["cpu_sys_us_per_req_each"] = [(a[1] - b[1]) * us_per_tick / n for a, b in zip(after, before)]
    r["cpu_us_per_req_each"] = [u + s for u, s in zip(r["cpu_user_us_per_req_each"],
                                                      r["cpu_sys_us_per_req_each"])]
    r["cpu_us_per_req"] = sum(r["cpu_us_per_req_each"])
    r["cpu_user_us_per_req"] = sum(r["cpu_user_us_per_req_each"])
    r["cpu_sys_us_per_req"] = sum(r["cpu_sys_us_per_req_each"])
    r["upstream_cpu_us_per_req"] = sum(up_after[i] - up_before[i] for i in (0, 1)) * \
        us_per_tick / n
    r["rss_after_wrk_kib"] = [proc_status_kib(p.pid, "VmRSS") for p in subjects]
    r["rss_after_wrk_anon_file_kib"] = [smaps_kib(p.pid) for p in subjects]

    r["oha"] = {}
    for rate in RATES:
        log(f"{name}: oha -q {rate} {args.oha_duration}s --latency-correction")
        r["oha"][str(rate)] = run_oha(port, rate, args.oha_duration)
        total += r["oha"][str(rate)]["responses"]
    r["total_requests"] = total + w["requests"]
    r["rss_hwm_kib"] = [proc_status_kib(p.pid, "VmHWM") for p in subjects]
    for p in subjects:
        if p.poll() is not None:
            raise RuntimeError(f"{p.bench_name} died during the run ({p.returncode})")
    return r


def run_scenario(name, procs, tmp, args, upstream_port, upstream_h2_port, upstream, rnd):
    port = free_port()
    tmp = os.path.join(tmp, f"{name}-{rnd + 1}")
    os.makedirs(tmp, exist_ok=True)
    if name == "direct":
        return measure(name, [upstream], upstream, upstream_port, args)
    others = []  # started for the scenario, not measured
    if name == "haproxy":
        subjects = start_haproxy(procs, tmp, port, upstream_port)
    elif name == "haproxy-h2up":
        subjects = start_haproxy(procs, tmp, port, upstream_h2_port, h2=True)
    elif name == "mesh-1hop-h2up":
        subjects = start_mesh_1hop(procs, tmp, args.proxy_bin, port, upstream_h2_port,
                                   protocol="http2")
    elif name == "nginx-proxy":
        subjects = start_nginx_proxy(procs, tmp, port, upstream_port)
    elif name == "mesh-1hop":
        subjects = start_mesh_1hop(procs, tmp, args.proxy_bin, port, upstream_port)
    elif name == "mesh-1hop-nolog":
        subjects = start_mesh_1hop(procs, tmp, args.proxy_bin, port, upstream_port,
                                   access_log=False)
    elif name == "mesh-2hop-mtls":
        subjects, control = start_mesh_2hop_mtls(procs, tmp, args.proxy_bin, args.control_bin,
                                                 port, upstream_port)
        others.append(control.proc)
    elif name.startswith("mesh-2hop-"):
        protocol = {"h1": "http1", "h2": "http2"}[name.rsplit("-", 1)[1]]
        subjects = start_mesh_2hop(procs, tmp, args.proxy_bin, port, upstream_port, protocol)
    else:
        raise ValueError(name)
    try:
        time.sleep(args.settle)
        r = measure(name, subjects, upstream, port, args)
        if name == "mesh-2hop-mtls":
            # Proof that the hop was mTLS on reused connections: handshakes few, no plaintext.
            r["b_tls_handshakes"], r["b_plaintext_requests"] = tls_counts(subjects[1].bench_admin)
        if name in MESH_SCENARIOS:
            # The access log is part of the measured cost: report its size per request.
            n = max(r["total_requests"], 1)
            r["stdout_bytes_per_req"] = []
            r["stdout_lines_per_req"] = []
            for p in subjects:
                with open(p.bench_log, "rb") as f:
                    data = f.read()
                r["stdout_bytes_per_req"].append(round(len(data) / n, 1))
                r["stdout_lines_per_req"].append(round(data.count(b"\n") / n, 3))
        return r
    finally:
        for p in subjects + others:
            procs.stop(p)


# === Report ===


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def aggregate(runs):
    """One row from the rounds of a scenario: the median of each metric (the max for VmHWM).
    A scenario that failed in any round is reported as failed."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    out["wrk"] = {k: median([r["wrk"][k] for r in runs]) for k in ("requests", "rps")}
    out["wrk"]["errors"] = sum(r["wrk"]["errors"] for r in runs)
    n = len(runs[0]["cpu_us_per_req_each"])
    out["cpu_us_per_req_each"] = [median([r["cpu_us_per_req_each"][i] for r in runs])
                                  for i in range(n)]
    for k in ("cpu_us_per_req", "cpu_user_us_per_req", "cpu_sys_us_per_req",
              "server_core_busy_pct", "server_core_foreign_pct", "loadgen_core_busy_pct",
              "loadgen_core_foreign_pct"):
        out[k] = round(median([r[k] for r in runs]), 2)
    out["upstream_cpu_us_per_req"] = median([r["upstream_cpu_us_per_req"] for r in runs])
    out["rss_idle_kib"] = [median([r["rss_idle_kib"][i] for r in runs]) for i in range(n)]
    out["rss_hwm_kib"] = [max(r["rss_hwm_kib"][i] for r in runs) for i in range(n)]
    for k in ("rss_idle_anon_file_kib", "rss_after_wrk_anon_file_kib"):
        out[k] = [[median([r[k][i][j] for r in runs]) for j in (0, 1)] for i in range(n)]
    out["oha"] = {}
    for rate in runs[0]["oha"]:
        os_ = [r["oha"][rate] for r in runs]
        agg = {k: median([o[k] for o in os_]) for k in os_[0] if k not in ("non_2xx", "errors")}
        agg["non_2xx"] = sum(o["non_2xx"] for o in os_)
        agg["errors"] = sum(o["errors"] for o in os_)
        out["oha"][rate] = agg
    for k in ("stdout_bytes_per_req", "stdout_lines_per_req"):
        if k in runs[0]:
            out[k] = runs[-1][k]
    out["rounds"] = len(runs)
    return out


def mib(kib):
    return kib / 1024.0


def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def table(results):
    by = {r["scenario"]: r for r in results if "error" not in r}
    direct = by.get("direct")
    hap = by.get("haproxy")
    ngx = by.get("nginx-proxy")
    hdr = ["scenario", "req/s (wrk c32)", "vs haproxy", "vs nginx-proxy",
           "p50/p99/p99.9 @2k (ms)", "+p99 @2k vs direct (ms)",
           "p50/p99/p99.9 @5k (ms)", "+p99 @5k vs direct (ms)",
           "CPU us/req [user, sys]", "RSS idle (MiB)", "RSS peak VmHWM (MiB)"]
    rows = []
    for r in results:
        name = r["scenario"]
        if "error" in r:
            what = "skipped" if r.get("skipped") else "FAILED"
            rows.append([name, f"{what}: {r['error']}"] + [""] * (len(hdr) - 2))
            continue
        rps = r["wrk"]["rps"]
        row = [name, f"{rps:,.0f}",
               fmt_ratio(rps, hap["wrk"]["rps"]) if hap else "-",
               fmt_ratio(rps, ngx["wrk"]["rps"]) if ngx else "-"]
        for rate in RATES:
            o = r["oha"][str(rate)]
            row.append(f"{o['p50_ms']:.3f} / {o['p99_ms']:.3f} / {o['p99_9_ms']:.3f}")
            if direct and name != "direct":
                d = o["p99_ms"] - direct["oha"][str(rate)]["p99_ms"]
                row.append(f"{d:+.3f}")
            else:
                row.append("(baseline)" if name == "direct" else "-")
        each = r["cpu_us_per_req_each"]
        cpu = f"{r['cpu_us_per_req']:.1f}"
        if len(each) > 1:
            cpu += " (" + " + ".join(f"{c:.1f}" for c in each) + ")"
        cpu += f" [{r['cpu_user_us_per_req']:.1f}u {r['cpu_sys_us_per_req']:.1f}s]"
        if name == "direct":
            cpu += " (upstream)"
        row.append(cpu)
        row.append(" + ".join(f"{mib(k):.1f}" for k in r["rss_idle_kib"]))
        row.append(" + ".join(f"{mib(k):.1f}" for k in r["rss_hwm_kib"]))
        rows.append(row)
    out = ["| " + " | ".join(hdr) + " |", "|" + "|".join("---" for _ in hdr) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def health_notes(results):
    """Anything that makes a row less trustworthy: errors, missed rates."""
    notes = []
    for r in results:
        if "error" in r:
            continue
        name = r["scenario"]
        foreign = max(r.get("server_core_foreign_pct", 0), r.get("loadgen_core_foreign_pct", 0))
        if foreign > 3:
            notes.append(f"{name}: other processes took {r['server_core_foreign_pct']}% of the "
                         f"servers' core and {r['loadgen_core_foreign_pct']}% of the load "
                         "generator's during the wrk run: throughput understated")
        elif name != "direct" and r.get("server_core_busy_pct", 100) < 90:
            notes.append(f"{name}: the servers' core was only {r['server_core_busy_pct']}% busy "
                         "during the wrk run: throughput was limited by waiting, not by CPU")
        if r["wrk"]["errors"]:
            notes.append(f"{name}: wrk saw {r['wrk']['errors']} errors / non-2xx responses")
        for rate, o in r["oha"].items():
            if o["non_2xx"] or o["errors"]:
                notes.append(f"{name} @{rate}: oha saw {o['non_2xx']} non-2xx and "
                             f"{o['errors']} errors")
            if o["achieved_rps"] < 0.95 * o["rate"]:
                notes.append(f"{name} @{rate}: only {o['achieved_rps']:.0f} req/s achieved "
                             f"(latencies then include queueing behind the rate)")
        if "stdout_bytes_per_req" in r:
            notes.append(f"{name}: proxy stdout (access log) "
                         f"{' + '.join(str(b) for b in r['stdout_bytes_per_req'])} bytes and "
                         f"{' + '.join(str(b) for b in r['stdout_lines_per_req'])} lines "
                         "per request")
    return notes


def targets(results):
    by = {r["scenario"]: r for r in results if "error" not in r}
    m = by.get("mesh-1hop")
    lines = []

    def check(label, ok, detail):
        lines.append(f"- [{'PASS' if ok else 'FAIL'}] {label}: {detail}")

    if not m:
        lines.append("- one-hop targets: not checked (no mesh-1hop result)")
        m = {}

    if m:
        d = by.get("direct")
        if d:
            added = m["oha"]["2000"]["p99_ms"] - d["oha"]["2000"]["p99_ms"]
            check(f"added p99 of one hop at 2,000 req/s <= {TARGET_ADDED_P99_MS_2K} ms",
                  added <= TARGET_ADDED_P99_MS_2K, f"{added:+.3f} ms")
        for base in ("haproxy", "nginx-proxy"):
            b = by.get(base)
            if b:
                ratio = m["wrk"]["rps"] / b["wrk"]["rps"]
                check(f"throughput >= {TARGET_THROUGHPUT_RATIO}x {base}",
                      ratio >= TARGET_THROUGHPUT_RATIO, f"{ratio:.2f}x")
        check(f"CPU <= {TARGET_CPU_US} us/request", m["cpu_us_per_req"] <= TARGET_CPU_US,
              f"{m['cpu_us_per_req']:.1f} us")
        idle = mib(m["rss_idle_kib"][0])
        check(f"RSS idle <= {TARGET_RSS_IDLE_MIB} MiB", idle <= TARGET_RSS_IDLE_MIB, f"{idle:.1f} MiB")
        peak = mib(m["rss_hwm_kib"][0])
        check(f"RSS under load (VmHWM) <= {TARGET_RSS_LOAD_MIB} MiB", peak <= TARGET_RSS_LOAD_MIB,
              f"{peak:.1f} MiB")
    tls, plain = by.get("mesh-2hop-mtls"), by.get("mesh-2hop-h2")
    if tls and plain:
        ratio = tls["cpu_us_per_req"] / plain["cpu_us_per_req"]
        check(f"two hops over mTLS: CPU per request <= {TARGET_MTLS_CPU_RATIO}x plaintext h2c",
              ratio <= TARGET_MTLS_CPU_RATIO,
              f"{ratio:.2f}x ({tls['cpu_us_per_req']:.1f} us against "
              f"{plain['cpu_us_per_req']:.1f} us)")
        added = tls["oha"]["2000"]["p99_ms"] - plain["oha"]["2000"]["p99_ms"]
        lines.append(f"- [info] p99 at 2,000 req/s added by mTLS over plaintext h2c: "
                     f"{added:+.3f} ms ({plain['oha']['2000']['p99_ms']:.3f} -> "
                     f"{tls['oha']['2000']['p99_ms']:.3f})")
        if "b_tls_handshakes" in tls:
            lines.append(f"- [info] sidecar B's inbound over the run: "
                         f"{tls['b_tls_handshakes']:.0f} mTLS handshakes, "
                         f"{tls['b_plaintext_requests']:.0f} plaintext requests, "
                         f"{tls['total_requests']:,} requests")
        for i, side in enumerate(("A", "B")):
            anon, file = tls["rss_idle_anon_file_kib"][i]
            lanon, lfile = tls["rss_after_wrk_anon_file_kib"][i]
            lines.append(f"- [info] RSS of sidecar {side} with identity on: idle "
                         f"{mib(tls['rss_idle_kib'][i]):.1f} MiB (budget "
                         f"{TARGET_RSS_IDLE_MIB}; {mib(anon):.1f} anonymous + {mib(file):.1f} "
                         f"file-backed), peak {mib(tls['rss_hwm_kib'][i]):.1f} MiB (budget "
                         f"{TARGET_RSS_LOAD_MIB}; after wrk {mib(lanon):.1f} anonymous + "
                         f"{mib(lfile):.1f} file-backed)")
    m2, h2 = by.get("mesh-1hop-h2up"), by.get("haproxy-h2up")
    if m2 and h2:
        lines.append(f"- [info] to the same upstream over h2c: mesh-1hop-h2up "
                     f"{m2['wrk']['rps'] / h2['wrk']['rps']:.2f}x haproxy-h2up, "
                     f"CPU {m2['cpu_us_per_req']:.1f} us/request "
                     f"(haproxy-h2up {h2['cpu_us_per_req']:.1f})")
    return lines


def environment():
    def cmd(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return None
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "nginx": cmd(["nginx", "-v"]),
        "haproxy": cmd(["haproxy", "-v"]),
        "wrk": cmd(["wrk", "-v"]),
        "oha": cmd(["oha", "--version"]),
        "git": cmd(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse",
                    "--short", "HEAD"]),
    }


# === Main ===


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~2 s per step: a smoke test")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all scenarios; the table shows the median of each metric")
    ap.add_argument("--only", help="comma-separated scenarios, from: " + ",".join(ALL_SCENARIOS))
    ap.add_argument("--proxy-bin",
                    default=os.path.join(here, "..", "target", "release", "mesh-proxy"))
    ap.add_argument("--control-bin",
                    default=os.path.join(here, "..", "target", "release", "mesh-control"))
    ap.add_argument("--skip-mesh", action="store_true",
                    help="do not run mesh scenarios (e.g. the build failed)")
    ap.add_argument("--out", default=os.path.join(here, "results", "latest.json"))
    ap.add_argument("--tmpdir", help="where configs and logs go (default: a new mkdtemp, "
                    "removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the default temporary directory")
    ap.add_argument("--pidfile", help="append every started PID here (for the caller's trap)")
    args = ap.parse_args()

    if args.quick:
        args.duration, args.oha_duration, args.warmup, args.settle = 2, 2, 1, 0.1
    else:
        args.duration, args.oha_duration, args.warmup, args.settle = 10, 10, 2, 0.5

    if os.cpu_count() < 2:
        sys.exit("need at least 2 cores (servers on core 1, load generators on core 0)")
    for tool in ("taskset", "nginx", "haproxy", "wrk", "oha"):
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool} (benches/run.sh installs it)")

    scenarios = args.only.split(",") if args.only else list(ALL_SCENARIOS)
    for s in scenarios:
        if s not in ALL_SCENARIOS:
            sys.exit(f"unknown scenario {s!r}; known: {', '.join(ALL_SCENARIOS)}")
    args.proxy_bin = os.path.abspath(args.proxy_bin)
    args.control_bin = os.path.abspath(args.control_bin)
    mesh_skip = None
    if args.skip_mesh:
        mesh_skip = "mesh scenarios disabled (--skip-mesh: the release build failed?)"
    elif not os.access(args.proxy_bin, os.X_OK):
        mesh_skip = f"mesh-proxy binary missing: {args.proxy_bin} (cargo build --release -p mesh-proxy)"
    elif "mesh-2hop-mtls" in scenarios and not os.access(args.control_bin, os.X_OK):
        mesh_skip = (f"mesh-control binary missing: {args.control_bin} "
                     "(cargo build --release -p mesh-control)")
    if "mesh-2hop-mtls" in scenarios and not shutil.which("openssl"):
        sys.exit("missing tool: openssl (the mTLS scenario makes its CA with it)")

    tmp = args.tmpdir or tempfile.mkdtemp(prefix="mesh-bench-")
    procs = Procs(args.pidfile)

    def on_signal(signum, _frame):
        kill_loadgens()
        procs.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    rounds = {name: [] for name in scenarios}
    load_before = os.getloadavg()
    try:
        upstream_port = free_port()
        upstream_h2_port = free_port()
        upstream = start_upstream(procs, tmp, upstream_port, upstream_h2_port)
        # Rounds interleave the scenarios, so that drift (other work on the machine, CPU
        # frequency) spreads over all of them instead of hitting one.
        for rnd in range(args.repeat):
            for name in scenarios:
                if name in MESH_SCENARIOS and mesh_skip:
                    if rnd == 0:
                        log(f"{name}: SKIPPED: {mesh_skip}")
                    rounds[name].append({"scenario": name, "error": mesh_skip, "skipped": True})
                    continue
                log(f"{name}: round {rnd + 1}/{args.repeat}")
                try:
                    rounds[name].append(
                        run_scenario(name, procs, tmp, args, upstream_port, upstream_h2_port,
                                     upstream, rnd))
                except (RuntimeError, subprocess.CalledProcessError, KeyError, ValueError) as e:
                    detail = getattr(e, "stderr", None) or ""
                    log(f"{name}: FAILED: {e} {detail}")
                    rounds[name].append({"scenario": name, "error": str(e).splitlines()[0][:200]})
                if upstream.poll() is not None:
                    raise RuntimeError(f"upstream nginx died ({upstream.returncode})")
    finally:
        procs.stop_all()
    load_after = os.getloadavg()
    results = [aggregate(rounds[name]) for name in scenarios]

    env = environment()
    mode = "quick" if args.quick else "full"
    print()
    print(f"## mesh-proxy load benchmark ({mode}: wrk {args.duration}s, oha {args.oha_duration}s "
          f"per rate; servers on core {SERVER_CORE}, load generators on core {LOADGEN_CORE})")
    print(f"{env['time']} {env['cpu']} kernel {env['kernel']} git {env['git']}")
    print()
    if load_before[0] > 0.5:
        print(f"WARNING: load average {load_before[0]:.2f} before the run (other work on the "
              "machine): tail latencies and throughput are noisy; rerun on an idle machine.")
        print()
    print(table(results))
    print()
    notes = health_notes(results)
    if notes:
        print("Notes:")
        for n in notes:
            print(f"- {n}")
        print()
    print("Targets (one hop: mesh-1hop; mTLS: mesh-2hop-mtls against mesh-2hop-h2):")
    for line in targets(results):
        print(line)
    print()

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"mode": mode, "environment": env, "repeat": args.repeat,
                   "loadavg_before": load_before, "loadavg_after": load_after, "body_bytes": len(BODY),
                   "connections": CONNS, "wrk_seconds": args.duration,
                   "oha_seconds": args.oha_duration, "results": results,
                   "rounds": rounds}, f, indent=2)
    print(f"results: {os.path.abspath(args.out)}")
    if args.tmpdir or args.keep:
        print(f"logs and configs: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    # A skipped mesh scenario (no binary) is not a failure; a scenario that broke is.
    return 1 if any("error" in r and not r.get("skipped") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
