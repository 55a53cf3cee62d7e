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
# body; oha sends 2,000 warm-up requests, the counters are zeroed (`callgrind_control -z`),
# then oha sends 10,000 requests over 32 connections. Prints the instructions counted from
# the zeroing to exit / 10,000 per binary, and each against the first. Needs valgrind, nginx and oha
# (benches/run.sh installs the last two). CALLGRIND_KEEP=DIR keeps each profile there as
# callgrind.N.out, for callgrind_annotate.
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
export PATH="$HOME/.cargo/bin:$PATH"
for tool in valgrind nginx oha; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done

source "$(dirname "${BASH_SOURCE[0]}")/one_hop.sh"

first=""
n=0
for arg in "$@"; do
    bin="${arg%%@trace=*}"
    ratio=""
    [[ "$arg" == *@trace=* ]] && ratio="${arg##*@trace=}"
    write_sidecar "$ratio"
    valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "$bin" --config "$tmp/bootstrap.toml" \
        >/dev/null 2>"$tmp/valgrind.log" &
    pid=$!
    pids+=("$pid")
    wait_port "$out"
    oha -n 2000 -c 32 --no-tui -H 'Host: up' "http://127.0.0.1:$out/" >/dev/null
    # Start-up (config, the metrics clock's calibration, which varies by several hundred
    # instructions per request between runs) and warm-up are left out of the count.
    callgrind_control -z "$pid" >/dev/null 2>&1
    oha -n 10000 -c 32 --no-tui -H 'Host: up' "http://127.0.0.1:$out/" >/dev/null
    kill -TERM "$pid"
    wait "$pid" || true
    total="$(grep -m1 '^summary:' "$tmp/cg.out" | awk '{print $2}')"
    if [[ -n "${CALLGRIND_KEEP:-}" ]]; then
        mkdir -p "$CALLGRIND_KEEP"
        cp "$tmp/cg.out" "$CALLGRIND_KEEP/callgrind.$((n += 1)).out"
    fi
    per=$((total / 10000))
    [[ -n "$first" ]] || first="$per"
    vs="$(python3 -c "print(f'{$per / $first:.3f}')")"
    echo "$arg: $per instructions / request (x$vs vs the first)"
done
