#!/usr/bin/env python3
"""Instructions per request of two sidecars, plaintext h2c against mTLS, counted by callgrind.

The load benchmark's `mesh-2hop-h2` and `mesh-2hop-mtls` set-ups (benches/load.py), each
sidecar run under `valgrind --tool=callgrind`. oha sends a warm-up (the mTLS connection and
the pools are made then), the counters are zeroed (`callgrind_control -z`), oha sends the
measured requests over 32 connections, and each sidecar's instructions are read from its
profile when it exits. Exact and independent of what else the machine runs, so it says what
a busy host's CPU timings cannot resolve.

    python3 benches/mtls_callgrind.py [--requests 10000]
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
