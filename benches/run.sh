#!/usr/bin/env bash
# Load benchmark entry point: installs the tools it needs, builds mesh-proxy in release mode and
# runs benches/load.py, which measures the same nginx upstream directly, through mesh-proxy
# (one and two hops), HAProxy and nginx in one run and prints a table with ratios.
#
#   bash benches/run.sh            # full run: ~10 s per step, about 6 minutes
#   bash benches/run.sh --quick    # smoke test: ~2 s per step
#   bash benches/run.sh --only direct,haproxy,mesh-1hop
#
# Everything listens on 127.0.0.1 only. Every process started is killed by PID on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

tmp="$(mktemp -d -t mesh-bench.XXXXXX)"
pidfile="$tmp/pids"
: >"$pidfile"
driver_pid=""

cleanup() {
    local rc=$?
    if [[ -n "$driver_pid" ]] && kill -0 "$driver_pid" 2>/dev/null; then
        kill "$driver_pid" 2>/dev/null || true
        wait "$driver_pid" 2>/dev/null || true
    fi
    # Anything the driver started and did not stop (it was killed, or crashed).
    while read -r pid; do
        [[ -n "$pid" ]] || continue
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            sleep 0.2
            kill -9 "$pid" 2>/dev/null || true
        fi
    done <"$pidfile"
    if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
        echo "kept configs and logs in $tmp" >&2
    else
        rm -rf "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "[run.sh] $*" >&2; }

# --- tools ---
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v taskset >/dev/null || need_apt+=(util-linux)
command -v python3 >/dev/null || need_apt+=(python3)
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]}"
    sudo_cmd=()
    [[ "$(id -u)" == 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_apt[@]}"
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null; then
    log "installing oha (cargo install oha --locked: a few minutes)"
    cargo install oha --locked
fi

# --- the proxy ---
driver_args=()
log "cargo build --release -p mesh-proxy"
if ! (cd "$root" && cargo build --release -p mesh-proxy); then
    # Do not measure a stale binary: run the baselines only and say so.
    log "WARNING: release build failed; mesh scenarios will be skipped"
    driver_args+=(--skip-mesh)
fi

# --- the run ---
python3 "$here/load.py" --proxy-bin "$root/target/release/mesh-proxy" --tmpdir "$tmp" \
    --pidfile "$pidfile" "${driver_args[@]}" "$@" &
driver_pid=$!
wait "$driver_pid"
