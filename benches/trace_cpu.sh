#!/usr/bin/env bash
# CPU per request and peak RSS of one hop at a fixed rate, tracing off, sampled out and sampled
# in, measured one after the other in one run (ratios against the first).
#
#   bash benches/trace_cpu.sh BIN [RATE] [SECONDS]    # defaults: 5000 req/s for 10 s
#
# The release sidecar (one worker thread, access log on, default resilience) routes service
# `up` to an nginx on 127.0.0.1 serving a 100-byte body; `oha -q RATE -c 32` loads it. Each
# configuration gets a fresh proxy: no `[trace]`; `[trace]` with `sampling = 0`; with
# `sampling = 1`, exporting to a local OTLP/HTTP sink. CPU is the growth of utime + stime
# (/proc/PID/stat, all threads) over the load, divided by the requests oha completed; RSS is
# VmHWM after the load. Needs nginx and oha (benches/run.sh installs them).
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 BIN [RATE] [SECONDS]" >&2; exit 2; }
bin="$1"
rate="${2:-5000}"
secs="${3:-10}"
export PATH="$HOME/.cargo/bin:$PATH"
for tool in nginx oha python3; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done

tmp="$(mktemp -d -t mesh-trace-cpu.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    exit 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

up="$(free_port)"
body="mesh-bench-$(printf 'x%.0s' $(seq 1 88))"
mkdir -p "$tmp/nginx/logs"
cat >"$tmp/nginx/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid $tmp/nginx/nginx.pid;
error_log stderr error;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 10000000;
    server { listen 127.0.0.1:$up; location / { return 200 "$body\n"; } }
}
NGINX
nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" &
pids+=($!)
wait_port "$up"

sink="$(free_port)"
python3 - "$sink" 2>/dev/null <<'PY' &
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
pids+=($!)
wait_port "$sink"

hz="$(getconf CLK_TCK)"
first=""
for mode in off sampled-out sampled-in; do
    out="$(free_port)"
    admin="$(free_port)"
    printf 'version = 1\n\n[[services]]\nname = "up"\nendpoints = ["127.0.0.1:%s"]\n' "$up" >"$tmp/snapshot.toml"
    cat >"$tmp/bootstrap.toml" <<BOOT
agent = "bench"
phase = "critical"

[listen]
outbound = "127.0.0.1:$out"
admin = "127.0.0.1:$admin"

[snapshot]
file = "$tmp/snapshot.toml"

[runtime]
worker_threads = 1

[drain]
grace = "1s"
BOOT
    case "$mode" in
        sampled-out) ratio=0 ;;
        sampled-in) ratio=1 ;;
        *) ratio="" ;;
    esac
    if [[ -n "$ratio" ]]; then
        printf '\n[trace]\nsampling = %s\n' "$ratio" >>"$tmp/snapshot.toml"
        printf '\n[trace]\nendpoint = "http://127.0.0.1:%s"\n' "$sink" >>"$tmp/bootstrap.toml"
    fi
    "$bin" --config "$tmp/bootstrap.toml" >/dev/null 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_port "$out"
    oha -n 2000 -c 32 --no-tui -H 'Host: up' "http://127.0.0.1:$out/" >/dev/null
    before="$(cpu_ticks "$pid")"
    done_n="$(oha -z "${secs}s" -q "$rate" -c 32 --no-tui --output-format json -H 'Host: up' \
        "http://127.0.0.1:$out/" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(v for k,v in d["statusCodeDistribution"].items() if k=="200"))')"
    after="$(cpu_ticks "$pid")"
    hwm="$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")"
    kill -TERM "$pid"
    wait "$pid" || true
    us="$(python3 -c "print(f'{($after - $before) / $hz * 1e6 / max($done_n, 1):.2f}')")"
    [[ -n "$first" ]] || first="$us"
    vs="$(python3 -c "print(f'{$us / $first:.3f}')")"
    echo "$mode: $done_n requests at $rate/s, $us us CPU / request (x$vs vs off), VmHWM $((hwm / 1024)) MiB"
done
