#!/usr/bin/env bash
# Instructions per request on the outbound path, counted by callgrind: exact and independent of
# what else the machine runs, so it ranks two builds measured on a busy host.
#
#   bash benches/callgrind.sh BIN [BIN...]   # release mesh-proxy binaries to compare
#   bash benches/callgrind.sh BIN BIN@trace=0 BIN@trace=1   # tracing off, sampled out, all
#
# `BIN@trace=RATIO` runs BIN with a bootstrap `[trace]` section (exporting to a local OTLP
# sink that answers every export 200) and `[trace] sampling = RATIO` in its snapshot.
#
# Each binary runs under `valgrind --tool=callgrind` with one worker thread and the access log
# on, routing service `up` (default resilience) to an nginx on 127.0.0.1 serving a 100-byte
# body; oha sends 2,000 warm-up then 10,000 requests over 32 connections. Prints total
# instructions / 12,000 per binary, and each against the first. Needs valgrind, nginx and oha
# (benches/run.sh installs the last two). CALLGRIND_KEEP=DIR keeps each profile there as
# callgrind.N.out, for callgrind_annotate.
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
export PATH="$HOME/.cargo/bin:$PATH"
for tool in valgrind nginx oha; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done

tmp="$(mktemp -d -t mesh-callgrind.XXXXXX)"
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

up="$(free_port)"
body="mesh-bench-$(printf 'x%.0s' $(seq 1 88))"
mkdir -p "$tmp/nginx/logs"
cat >"$tmp/nginx/nginx.conf" <<EOF
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
EOF
nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" &
pids+=($!)
wait_port "$up"

# An OTLP/HTTP sink for `@trace=` runs: reads each export, answers 200 with an empty body.
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

first=""
n=0
for arg in "$@"; do
    bin="${arg%%@trace=*}"
    ratio=""
    [[ "$arg" == *@trace=* ]] && ratio="${arg##*@trace=}"
    out="$(free_port)"
    admin="$(free_port)"
    printf 'version = 1\n\n[[services]]\nname = "up"\nendpoints = ["127.0.0.1:%s"]\n' "$up" >"$tmp/snapshot.toml"
    [[ -z "$ratio" ]] || printf '\n[trace]\nsampling = %s\n' "$ratio" >>"$tmp/snapshot.toml"
    cat >"$tmp/bootstrap.toml" <<EOF
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
EOF
    [[ -z "$ratio" ]] || printf '\n[trace]\nendpoint = "http://127.0.0.1:%s"\n' "$sink" >>"$tmp/bootstrap.toml"
    valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "$bin" --config "$tmp/bootstrap.toml" \
        >/dev/null 2>"$tmp/valgrind.log" &
    pid=$!
    pids+=("$pid")
    wait_port "$out"
    oha -n 2000 -c 32 --no-tui -H 'Host: up' "http://127.0.0.1:$out/" >/dev/null
    oha -n 10000 -c 32 --no-tui -H 'Host: up' "http://127.0.0.1:$out/" >/dev/null
    kill -TERM "$pid"
    wait "$pid" || true
    total="$(grep -m1 '^summary:' "$tmp/cg.out" | awk '{print $2}')"
    if [[ -n "${CALLGRIND_KEEP:-}" ]]; then
        mkdir -p "$CALLGRIND_KEEP"
        cp "$tmp/cg.out" "$CALLGRIND_KEEP/callgrind.$((n += 1)).out"
    fi
    per=$((total / 12000))
    [[ -n "$first" ]] || first="$per"
    vs="$(python3 -c "print(f'{$per / $first:.3f}')")"
    echo "$arg: $per instructions / request (x$vs vs the first)"
done
