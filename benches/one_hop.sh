# The one-hop rig shared by callgrind.sh and trace_cpu.sh (sourced, not run): a temporary
# directory and the PIDs to end on exit, free ports, an nginx upstream on 127.0.0.1 serving a
# 100-byte body ($up), an OTLP/HTTP sink answering every export 200 ($sink), and the sidecar's
# files for one run (`write_sidecar RATIO`: service `up`, one worker thread, access log on,
# default resilience; with RATIO, a `[trace]` section exporting to the sink and
# `[trace] sampling = RATIO` in the snapshot). Sets $out, the outbound port of that run.

tmp="$(mktemp -d -t mesh-one-hop.XXXXXX)"
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

write_sidecar() {
    local ratio="${1:-}"
    out="$(free_port)"
    local admin
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
    if [[ -n "$ratio" ]]; then
        printf '\n[trace]\nsampling = %s\n' "$ratio" >>"$tmp/snapshot.toml"
        printf '\n[trace]\nendpoint = "http://127.0.0.1:%s"\n' "$sink" >>"$tmp/bootstrap.toml"
    fi
}
