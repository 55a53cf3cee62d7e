#!/usr/bin/env python3
"""Handshakes per second one sidecar's inbound listener completes, and its CPU per handshake.

One sidecar (agent `upstream`, certificate from mesh-control, mode permissive so plaintext is
served too) in front of the benchmark's nginx, pinned to core 1 with one runtime thread.
Client processes on core 0 open a new connection per request, for each of three steps
measured in the same run and interleaved over --repeat rounds:

  tls-new    a full TLS 1.3 handshake with a client certificate of the mesh (no resumption),
             one GET, close: what a handshake costs the sidecar, request included;
  plain-new  the same without TLS (the baseline: connection + request, no handshake);
  tls-reuse  one TLS connection per client, requests kept alive (no handshakes).

CPU per connection is the growth of the sidecar's utime + stime over the step divided by the
connections completed; the handshake's own cost is tls-new minus plain-new. Capacity on one
core is 1e6 / (CPU us per connection): the clients (Python + OpenSSL on one core) may not
keep the sidecar's core busy, so the achieved rate is printed with the core's busy share.

    python3 benches/handshakes.py [--seconds 10] [--repeat 3] [--clients 4]
"""

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the load benchmark's processes, CA and control helpers)

STEPS = ("tls-new", "plain-new", "tls-reuse")
REQUEST = b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n"
REQUEST_CLOSE = b"GET / HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n"


def client_context(ca, cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    # The sidecar's certificate names it by a spiffe:// URI only; the chain is still checked.
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def read_response(sock, buf):
    """Reads one response with a Content-Length body; returns (status, rest of buf)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a body")
        rest += chunk
    return status, rest[length:]


def worker(step, port, files, seconds, out):
    os.sched_setaffinity(0, {int(load.LOADGEN_CORE)})
    ctx = client_context(*files) if step != "plain-new" else None
    ok = errors = 0
    end = time.monotonic() + seconds
    try:
        if step == "tls-reuse":
            raw = socket.create_connection(("127.0.0.1", port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = ctx.wrap_socket(raw)
            buf = b""
            while time.monotonic() < end:
                s.sendall(REQUEST)
                status, buf = read_response(s, buf)
                ok += status == 200
                errors += status != 200
            s.close()
        else:
            while time.monotonic() < end:
                try:
                    raw = socket.create_connection(("127.0.0.1", port))
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s = ctx.wrap_socket(raw) if ctx else raw
                    s.sendall(REQUEST_CLOSE)
                    status, _ = read_response(s, b"")
                    s.close()
                    ok += status == 200
                    errors += status != 200
                except (OSError, ssl.SSLError, ValueError):
                    errors += 1
    finally:
        out.put((ok, errors))


def run_step(step, sidecar, port, files, args):
    q = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=worker, args=(step, port, files, args.seconds, q))
               for _ in range(args.clients)]
    before = load.proc_cpu_ticks(sidecar.pid)
    core_before = load.core_busy_ticks(load.SERVER_CORE)
    t0 = time.monotonic()
    for w in workers:
        w.start()
    results = [q.get(timeout=args.seconds + 30) for _ in workers]
    for w in workers:
        w.join(timeout=10)
    wall = time.monotonic() - t0
    after = load.proc_cpu_ticks(sidecar.pid)
    core_after = load.core_busy_ticks(load.SERVER_CORE)
    ok = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    ticks = sum(after) - sum(before)
    cpu_s = ticks / load.CLK_TCK
    core_total = max(core_after[1] - core_before[1], 1)
    return {
        "step": step,
        "completed": ok,
        "errors": errors,
        "per_second": ok / wall,
        "cpu_us_per_conn": cpu_s * 1e6 / max(ok, 1),
        "sidecar_core_share_pct": 100.0 * cpu_s / wall,
        "server_core_busy_pct": 100.0 * (core_after[0] - core_before[0]) / core_total,
        "rss_kib": load.proc_status_kib(sidecar.pid, "VmRSS"),
    }


def start(procs, tmp, args):
    upstream_port = load.free_port()
    upstream = load.start_upstream(procs, tmp, upstream_port, load.free_port())
    inbound = load.free_port()
    ca = load.MeshCa(tmp)
    control = load.Control(procs, tmp, args.control_bin, ca, ["upstream"],
                           [("upstream", [inbound])], mode="permissive")
    sidecar = load.start_mesh(procs, tmp, args.proxy_bin, "upstream", load.free_port(),
                              load.free_port(), [], inbound=inbound, inbound_app=upstream_port,
                              control=control)
    files = (ca.cert, *ca.client_cert("bench-client"))
    # Ready once the sidecar holds its certificate and answers a mesh client over mTLS.
    ctx = client_context(*files)
    deadline = time.monotonic() + 20
    while True:
        try:
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", inbound))) as s:
                s.sendall(REQUEST_CLOSE)
                if read_response(s, b"")[0] == 200:
                    break
        except (OSError, ssl.SSLError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the sidecar did not answer mTLS within 20 s")
        time.sleep(0.05)
    return upstream, sidecar, inbound, files


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--proxy-bin", default=os.path.join(here, "..", "target", "release",
                                                        "mesh-proxy"))
    ap.add_argument("--control-bin", default=os.path.join(here, "..", "target", "release",
                                                          "mesh-control"))
    ap.add_argument("--out", default=os.path.join(here, "results", "handshakes.json"))
    args = ap.parse_args()
    args.proxy_bin = os.path.abspath(args.proxy_bin)
    args.control_bin = os.path.abspath(args.control_bin)
    for tool in ("taskset", "nginx", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool}")
    for b in (args.proxy_bin, args.control_bin):
        if not os.access(b, os.X_OK):
            sys.exit(f"missing binary: {b} (cargo build --release -p mesh-proxy -p mesh-control)")

    tmp = tempfile.mkdtemp(prefix="mesh-handshakes-")
    procs = load.Procs(None)
    rounds = {s: [] for s in STEPS}
    load_before = os.getloadavg()
    try:
        _, sidecar, port, files = start(procs, tmp, args)
        idle_rss = load.proc_status_kib(sidecar.pid, "VmRSS")
        for rnd in range(args.repeat):
            for step in STEPS:
                load.log(f"handshakes: {step} round {rnd + 1}/{args.repeat}")
                rounds[step].append(run_step(step, sidecar, port, files, args))
        hwm = load.proc_status_kib(sidecar.pid, "VmHWM")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {s: {k: statistics.median(r[k] for r in rounds[s])
               for k in rounds[s][0] if k != "step"} for s in STEPS}
    print(f"\n## One sidecar's inbound: new connections per second ({args.clients} clients on "
          f"core {load.LOADGEN_CORE}, sidecar on core {load.SERVER_CORE}, {args.seconds:g} s per "
          f"step, median of {args.repeat}; load average {load_before[0]:.2f} at the start)\n")
    print("| step | completed/s | errors | sidecar CPU us/conn | sidecar core share | "
          "capacity on one core (/s) |")
    print("|---|---|---|---|---|---|")
    for s in STEPS:
        m = med[s]
        print(f"| {s} | {m['per_second']:,.0f} | {sum(r['errors'] for r in rounds[s])} | "
              f"{m['cpu_us_per_conn']:.1f} | {m['sidecar_core_share_pct']:.0f} % | "
              f"{1e6 / m['cpu_us_per_conn']:,.0f} |")
    hs = med["tls-new"]["cpu_us_per_conn"] - med["plain-new"]["cpu_us_per_conn"]
    print(f"\nCPU per handshake (tls-new - plain-new): {hs:.1f} us; tls-new against plain-new: "
          f"{med['tls-new']['cpu_us_per_conn'] / med['plain-new']['cpu_us_per_conn']:.2f}x")
    rates = " / ".join(f"{r['per_second']:,.0f}" for r in rounds["tls-new"])
    cpus = " / ".join(f"{r['cpu_us_per_conn']:.1f}" for r in rounds["tls-new"])
    print(f"Rounds, tls-new completed/s: {rates}; CPU us/conn: {cpus}")
    print(f"Sidecar RSS: idle {idle_rss / 1024:.1f} MiB, peak (VmHWM) {hwm / 1024:.1f} MiB")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"clients": args.clients, "seconds": args.seconds, "loadavg_before": load_before,
                   "rounds": rounds, "median": med, "cpu_us_per_handshake": hs,
                   "rss_idle_kib": idle_rss, "rss_hwm_kib": hwm}, f, indent=2)
    print(f"results: {os.path.abspath(args.out)}")
    return 1 if any(r["errors"] for s in STEPS for r in rounds[s]) else 0


if __name__ == "__main__":
    sys.exit(main())
