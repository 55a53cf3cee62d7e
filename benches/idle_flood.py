#!/usr/bin/env python3
"""RSS of a sidecar before, during and after a flood of idle connections (issue 15, item 4).

    python3 benches/idle_flood.py BIN [BIN...] [--connections 5000]

Each binary (a release mesh-proxy) runs with the embedded-style bootstrap below on free ports.
The script reads VmRSS from /proc: idle after one request, with N connections open that send
nothing (all accepted: agent_connections_total reaches N), with N connections that each sent one
GET and stay open (keep-alive), and after all have closed (the lowest value within 10 s).
"""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric(admin, name, labels):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(what, check, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def get(port, keep=None):
    s = keep or socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return s, data


def run(binary, n):
    app = free_port()
    # A tiny app: every request gets a 2-byte answer.
    app_srv = subprocess.Popen(
        [sys.executable, "-c", f"""
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        # One write: a head and a body in two would meet delayed ACKs.
        self.wfile.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok")
    def log_message(self, *a): pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("127.0.0.1", {app}), H).serve_forever()
"""])
    out, admin = free_port(), free_port()
    tmp = tempfile.mkdtemp()
    snap = os.path.join(tmp, "snapshot.toml")
    with open(snap, "w") as f:
        f.write(f'version = 1\n[[services]]\nname = "b"\nphase = "critical"\nendpoints = ["127.0.0.1:{app}"]\n')
    boot = os.path.join(tmp, "sidecar.toml")
    with open(boot, "w") as f:
        f.write(
            f'agent = "a"\nphase = "critical"\n[listen]\noutbound = "127.0.0.1:{out}"\nadmin = "127.0.0.1:{admin}"\n'
            f'[snapshot]\nfile = "{snap}"\n[runtime]\nworker_threads = 1\n[log]\naccess = false\nlevel = "warn"\n'
        )
    proxy = subprocess.Popen([binary, "--config", boot], stdout=subprocess.DEVNULL)
    try:
        wait_for("the proxy", lambda: _connects(out) and _connects(app))
        get(out)[0].close()
        time.sleep(1)
        idle = rss_mb(proxy.pid)
        socks = []
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", out)))
        wait_for("every connection accepted", lambda: metric(admin, "agent_connections_total", {"listener": "outbound"}) >= n + 1)
        silent = rss_mb(proxy.pid)
        print(f"  {n} silent connections accepted", file=sys.stderr, flush=True)
        for s in socks:
            s.close()
        socks = [get(out)[0] for _ in range(n)]
        served = rss_mb(proxy.pid)
        print(f"  {n} keep-alive connections served", file=sys.stderr, flush=True)
        for s in socks:
            s.close()
        after = []
        for _ in range(20):
            time.sleep(0.5)
            after.append(rss_mb(proxy.pid))
        print(f"{binary}: idle {idle:.1f} MB, {n} silent {silent:.1f} MB, {n} served keep-alive {served:.1f} MB, after close {min(after):.1f} MB (10 s later {after[-1]:.1f} MB)")
    finally:
        proxy.kill()
        proxy.wait()
        app_srv.kill()
        app_srv.wait()


def _connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    args = sys.argv[1:]
    n = 5000
    if "--connections" in args:
        i = args.index("--connections")
        n = int(args[i + 1])
        del args[i : i + 2]
    for binary in args:
        run(binary, n)
