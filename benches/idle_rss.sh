#!/usr/bin/env bash
# Idle RSS of release sidecars with the embedded default bootstrap (config/local/sidecar.toml:
# no [trace], no [identity], no control process), so two builds are compared in one sitting.
#
#   bash benches/idle_rss.sh BIN [BIN...]    # ROUNDS=5 by default, binaries interleaved
#
# The bootstrap is the embedded one with its three listeners moved to free ports (the
# embedded ports may be taken by another sidecar on the host). Each run waits for the admin
# `/ready`, then one second more for the start-up tasks to settle, and reads VmRSS and
# RssFile (file-backed pages: the binary's and the shared libraries') from /proc/PID/status
# and the binary's own mapped pages from /proc/PID/smaps. Run from the repository root.
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
rounds="${ROUNDS:-5}"
tmp="$(mktemp -d -t mesh-idle-rss.XXXXXX)"
pid=""
cleanup() {
    [[ -z "$pid" ]] || kill "$pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ready() { python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(200):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.05)
sys.exit("the sidecar never became ready")
PY
}

declare -A rss file own
for ((r = 1; r <= rounds; r++)); do
    for bin in "$@"; do
        sed -e "s/127.0.0.1:15001/127.0.0.1:$(free_port)/" \
            -e "s/127.0.0.1:10300/127.0.0.1:$(free_port)/" \
            -e "s/127.0.0.1:15090/127.0.0.1:${admin:=$(free_port)}/" \
            config/local/sidecar.toml >"$tmp/sidecar.toml"
        "$bin" --config "$tmp/sidecar.toml" >/dev/null 2>&1 &
        pid=$!
        ready "$admin"
        sleep 1 # settle after readiness, not synchronisation: the figure is read once idle
        rss[$bin]+="$(awk '/^VmRSS/ {printf "%.2f ", $2 / 1024}' "/proc/$pid/status")"
        file[$bin]+="$(awk '/^RssFile/ {printf "%.2f ", $2 / 1024}' "/proc/$pid/status")"
        # The binary's own mapped pages (its code and read-only data), from smaps.
        own[$bin]+="$(awk -v exe="$(readlink -f "$bin")" '
            /^[0-9a-f]+-[0-9a-f]+ / { mine = ($NF == exe) }
            mine && /^Rss:/ { kb += $2 }
            END { printf "%.2f ", kb / 1024 }' "/proc/$pid/smaps")"
        kill -TERM "$pid"
        wait "$pid" || true
        pid=""
        unset admin
    done
done
for bin in "$@"; do
    echo "$bin: VmRSS MiB ${rss[$bin]}(RssFile ${file[$bin]}; the binary's pages ${own[$bin]})"
done
