#!/usr/bin/env python3
"""Instructions per request of two sidecars, plaintext h2c against mTLS, and per handshake of
one sidecar's inbound, counted by callgrind.

Per request: the load benchmark's `mesh-2hop-h2` and `mesh-2hop-mtls` set-ups
(benches/load.py), each sidecar run under `valgrind --tool=callgrind`. oha sends a warm-up
(the mTLS connection and the pools are made then), the counters are zeroed
(`callgrind_control -z`), oha sends the measured requests over 32 connections, and each
sidecar's instructions are read from its profile when it exits.

Per handshake: `handshakes.py`'s sidecar (mode permissive) under callgrind; a client opens
--connections new connections one after another, each with one GET, plaintext and then with
a full TLS 1.3 handshake and a mesh client certificate, the counters zeroed before and dumped
after each; the difference per connection is the handshake.

Exact and independent of what else the machine runs, so it says what a busy host's CPU
timings cannot resolve (user space only: the kernel's work is not counted).

    python3 benches/mtls_callgrind.py [--requests 10000] [--connections 300]
"""

import argparse
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import handshakes  # noqa: E402
import load  # noqa: E402

_ready = load.wait_ready


def slow_ready(*args, timeout=10.0, **kwargs):
    # Everything runs some 50 times slower under valgrind.
    return _ready(*args, timeout=timeout * 10, **kwargs)


load.wait_ready = slow_ready


def wrapper(tmp, proxy_bin):
    """A mesh-proxy that is callgrind running mesh-proxy (exec: the PID stays the same)."""
    path = os.path.join(tmp, "mesh-proxy-callgrind")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexec valgrind --tool=callgrind "
                f"--callgrind-out-file={tmp}/cg.%p.out {proxy_bin} \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def oha(port, n):
    subprocess.run(["taskset", "-c", load.LOADGEN_CORE, "oha", "-n", str(n), "-c", "32",
                    "--no-tui", "-H", "Host: upstream", f"http://127.0.0.1:{port}/"],
                   check=True, capture_output=True)


def instructions(profile):
    with open(profile) as f:
        for line in f:
            m = re.match(r"(?:summary|totals): (\d+)", line)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"no totals in {profile}")


def run(kind, args):
    tmp = tempfile.mkdtemp(prefix=f"mesh-cg-{kind}-")
    procs = load.Procs(None)
    try:
        up = load.free_port()
        load.start_upstream(procs, tmp, up, load.free_port())
        port = load.free_port()
        bin_ = wrapper(tmp, args.proxy_bin)
        if kind == "h2c":
            subjects = load.start_mesh_2hop(procs, tmp, bin_, port, up, "http2")
        else:
            subjects, _ = load.start_mesh_2hop_mtls(procs, tmp, bin_, args.control_bin, port,
                                                    up)
        oha(port, 2000)
        for p in subjects:
            subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True,
                           capture_output=True)
        oha(port, args.requests)
        counts = []
        for p in subjects:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
            counts.append(instructions(os.path.join(tmp, f"cg.{p.pid}.out")))
            procs.procs.remove(p)
        return counts
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def new_connections(port, ctx, n):
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            s = ctx.wrap_socket(raw) if ctx else raw
            s.sendall(handshakes.REQUEST_CLOSE)
            status, _ = handshakes.read_response(s, b"")
            if status != 200:
                raise RuntimeError(f"status {status}")


def per_handshake(args):
    """(instructions per plaintext connection, per mTLS connection) of one sidecar."""
    tmp = tempfile.mkdtemp(prefix="mesh-cg-handshake-")
    procs = load.Procs(None)
    try:
        up = load.free_port()
        load.start_upstream(procs, tmp, up, load.free_port())
        inbound = load.free_port()
        ca = load.MeshCa(tmp)
        control = load.Control(procs, tmp, args.control_bin, ca, ["upstream"],
                               [("upstream", [inbound])], mode="permissive")
        sidecar = load.start_mesh(procs, tmp, wrapper(tmp, args.proxy_bin), "upstream",
                                  load.free_port(), load.free_port(), [], inbound=inbound,
                                  inbound_app=up, control=control)
        ctx = handshakes.client_context(ca.cert, *ca.client_cert("bench-client"))
        deadline = time.monotonic() + 120
        while True:
            try:
                new_connections(inbound, ctx, 1)
                break
            except (OSError, ssl.SSLError, ValueError, RuntimeError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the sidecar did not answer mTLS within 120 s")
                time.sleep(0.2)
        new_connections(inbound, None, 50)
        new_connections(inbound, ctx, 50)
        out = []
        for i, c in enumerate((None, ctx), start=1):
            subprocess.run(["callgrind_control", "-z", str(sidecar.pid)], check=True,
                           capture_output=True)
            new_connections(inbound, c, args.connections)
            subprocess.run(["callgrind_control", "-d", str(sidecar.pid)], check=True,
                           capture_output=True)
            out.append(instructions(os.path.join(tmp, f"cg.{sidecar.pid}.out.{i}")) /
                       args.connections)
        return out
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--connections", type=int, default=300)
    ap.add_argument("--proxy-bin", default=os.path.join(here, "..", "target", "release",
                                                        "mesh-proxy"))
    ap.add_argument("--control-bin", default=os.path.join(here, "..", "target", "release",
                                                          "mesh-control"))
    args = ap.parse_args()
    args.proxy_bin = os.path.abspath(args.proxy_bin)
    args.control_bin = os.path.abspath(args.control_bin)
    for tool in ("valgrind", "callgrind_control", "nginx", "oha", "openssl", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool}")
    rows = {}
    for kind in ("h2c", "mtls"):
        load.log(f"callgrind: {kind}")
        a, b = run(kind, args)
        rows[kind] = (a / args.requests, b / args.requests)
    print(f"\n## Instructions per request, two sidecars ({args.requests:,} requests after "
          "2,000 of warm-up, counters zeroed between)\n")
    print("| hop between sidecars | sidecar A | sidecar B | A + B | against h2c |")
    print("|---|---|---|---|---|")
    base = sum(rows["h2c"])
    for kind, (a, b) in rows.items():
        print(f"| {kind} | {a:,.0f} | {b:,.0f} | {a + b:,.0f} | {(a + b) / base:.3f}x |")
    load.log("callgrind: handshakes")
    plain, tls = per_handshake(args)
    print(f"\n## Instructions per new connection to one sidecar's inbound ({args.connections} "
          "each, one GET per connection)\n")
    print(f"- plaintext: {plain:,.0f}\n- TLS 1.3 with a client certificate: {tls:,.0f}\n"
          f"- per handshake (the difference): {tls - plain:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
