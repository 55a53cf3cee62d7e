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

source "$(dirname "${BASH_SOURCE[0]}")/one_hop.sh"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

hz="$(getconf CLK_TCK)"
first=""
for mode in off sampled-out sampled-in; do
    case "$mode" in
        sampled-out) ratio=0 ;;
        sampled-in) ratio=1 ;;
        *) ratio="" ;;
    esac
    write_sidecar "$ratio"
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
