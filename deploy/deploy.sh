#!/usr/bin/env bash
# Phased deployment of the agent mesh (Rules 2 and 25):
#   infrastructure -> critical -> performance -> specialized
# Each phase waits for health before the next. Within an agent phase a canary of 10 % of its
# agents (at least one) goes first and is watched: health, and the error rate and p99 latency
# its sidecars export, against the policy's thresholds ([rollout] in config/mesh, rendered into
# deploy/generated/rollout.env). A failing canary or phase is rolled
# back to the last configuration that deployed (or removed, on a first deployment), and the run
# stops with the reason. A phase whose rendered configuration is unchanged and healthy is left
# alone: re-running a finished deployment changes nothing.
set -euo pipefail

readonly PHASES=(infrastructure critical performance specialized)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

usage() {
    cat <<USAGE
Usage: deploy/deploy.sh --phase PHASE [--env NAME] [--timeout SECONDS] [--build]

  --phase    infrastructure | critical | performance | specialized | all
  --env      settings from deploy/env/NAME.env (default: local)
  --timeout  seconds to wait for each step to become healthy (default: 180)
  --build    rebuild the mesh-proxy image before starting sidecars

The canary's size, watch and thresholds per phase are policy ([rollout] in config/mesh),
rendered by `mesh-control render` into deploy/generated/rollout.env. What each phase last
deployed is kept in deploy/state/NAME/ (DEPLOY_STATE_DIR overrides); it is what a rollback
restores.
USAGE
}

log() {
    printf '%s deploy: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

die() {
    log "STOP: $*"
    exit 1
}

phase=""
env_name="local"
timeout=180
build=()

while (($#)); do
    case "$1" in
    --phase) phase="${2:-}"; shift 2 || die "--phase needs a value" ;;
    --env) env_name="${2:-}"; shift 2 || die "--env needs a value" ;;
    --timeout) timeout="${2:-}"; shift 2 || die "--timeout needs a value" ;;
    --build) build=(--build); shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ -n "$phase" ]] || { usage >&2; die "--phase is required"; }
case "$phase" in
all) selected=("${PHASES[@]}") ;;
infrastructure | critical | performance | specialized) selected=("$phase") ;;
*) die "unknown phase '$phase' (expected: ${PHASES[*]} or all)" ;;
esac
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"

env_file="$ROOT/deploy/env/$env_name.env"
if [[ ! -f "$env_file" ]]; then
    known=()
    for f in "$ROOT"/deploy/env/*.env; do
        [[ -e "$f" ]] && known+=("$(basename "$f" .env)")
    done
    die "no environment '$env_name': $env_file is missing (known: ${known[*]:-none})"
fi
# shellcheck disable=SC1090
set -a; source "$env_file"; set +a
for v in CANARY_PERCENT CANARY_WATCH_SECONDS CANARY_MAX_ERROR_RATE CANARY_MAX_P99_SECONDS; do
    [[ -z "${!v:-}" ]] ||
        die "$v is set (in $env_file or the environment): canary thresholds are policy now, [rollout] in config/mesh/rollout.toml; remove it and re-render"
done
rollout_file="$ROOT/deploy/generated/rollout.env"
[[ -f "$rollout_file" ]] || die "$rollout_file is missing: run \`mesh-control render\`"
# shellcheck disable=SC1090
source "$rollout_file"
canary_percent="" watch_seconds="" max_error_rate="" max_p99=""
poll="${DEPLOY_POLL_SECONDS:-2}"
state_dir="${DEPLOY_STATE_DIR:-$ROOT/deploy/state/$env_name}"
mkdir -p "$state_dir"
reason=""

command -v docker >/dev/null || die "docker is not installed"
docker compose version >/dev/null 2>&1 || die "the docker compose plugin is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (is it running? may this user use it?)"
# Mesh identity: the compose secrets (mesh CA, bootstrap tokens) exist before anything starts.
[[ -f "$ROOT/deploy/secrets/agent-tokens.toml" && -f "$ROOT/deploy/secrets/ca/ca.pem" ]] ||
    die "no deploy/secrets/: make them first with 'mesh-control secrets' (cargo run -p mesh-control -- secrets)"

# compose [--from DIR] ARGS: the rendered deployment in ROOT, or a saved one in DIR.
compose() {
    local dir="$ROOT"
    if [[ "${1:-}" == --from ]]; then dir="$2"; shift 2; fi
    docker compose --project-name agent-mesh --project-directory "$dir" -f "$dir/docker-compose.yml" \
        --env-file "$env_file" "$@"
}

# Prints "ok", "wait ..." or "fail: <reason>" for one container.
container_state() {
    local id="$1" status health exit_code restart
    IFS='|' read -r status health exit_code restart < <(
        docker inspect --format \
            '{{.State.Status}}|{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}|{{.State.ExitCode}}|{{.HostConfig.RestartPolicy.Name}}' \
            "$id"
    )
    case "$status" in
    running)
        case "$health" in
        healthy | none) echo ok ;;
        *) echo "wait ($health)" ;;
        esac
        ;;
    exited)
        if [[ "$restart" == "no" && "$exit_code" == 0 ]]; then
            echo ok
        elif [[ "$restart" == "no" ]]; then
            echo "fail: exited with code $exit_code"
        else
            echo "wait (exited $exit_code, restarting)"
        fi
        ;;
    dead) echo "fail: container is dead" ;;
    *) echo "wait ($status)" ;;
    esac
}

# wait_healthy SERVICE...: 0 when all are healthy within the timeout; else sets `reason`.
wait_healthy() {
    local deadline=$((SECONDS + timeout)) service id state
    local -a pending failed
    while :; do
        pending=()
        failed=()
        for service in "$@"; do
            id="$(compose ps --all --quiet "$service" | head -n 1)"
            if [[ -z "$id" ]]; then
                pending+=("$service (no container)")
                continue
            fi
            state="$(container_state "$id")"
            case "$state" in
            ok) ;;
            fail*) failed+=("$service: ${state#fail: }") ;;
            *) pending+=("$service ${state#wait }") ;;
            esac
        done
        if ((${#failed[@]})); then
            reason="failed: ${failed[*]}"
            return 1
        fi
        ((${#pending[@]} == 0)) && return 0
        if ((SECONDS >= deadline)); then
            reason="not healthy after ${timeout}s: ${pending[*]}"
            return 1
        fi
        sleep "$poll"
    done
}

# "RATE P99": an agent's inbound error rate and p99 latency (seconds, or inf) from its
# sidecar's /metrics (agent_requests_total, agent_errors_total, the duration histogram).
read_metrics() {
    compose exec -T "$1-sidecar" curl -fsS --max-time 2 http://127.0.0.1:15090/metrics |
        awk '
        /^agent_requests_total[{ ]/ { total += $NF }
        /^agent_errors_total[{ ]/ { errors += $NF }
        /^agent_request_duration_seconds_bucket[{]/ {
            match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
            if (le == "+Inf") count += $NF; else { bucket[le + 0] += $NF; seen[le + 0] = 1 }
        }
        END {
            rate = total > 0 ? errors / total : 0
            p99 = 0
            if (count > 0) {
                p99 = "inf"; best = ""
                for (le in seen) if (bucket[le] >= 0.99 * count && (best == "" || le + 0 < best + 0)) best = le
                if (best != "") p99 = best
            }
            printf "%s %s\n", rate, p99
        }'
}

# watch_canary AGENT...: health and metrics for the watch period; sets `reason` on failure.
watch_canary() {
    local until=$((SECONDS + watch_seconds)) agent rate p99 metrics
    local -a pairs=()
    for agent in "$@"; do pairs+=("$agent" "$agent-sidecar"); done
    while :; do
        wait_healthy "${pairs[@]}" || { reason="canary $reason"; return 1; }
        for agent in "$@"; do
            if ! metrics="$(read_metrics "$agent")" || [[ -z "$metrics" ]]; then
                reason="canary $agent: its sidecar's metrics cannot be read"
                return 1
            fi
            read -r rate p99 <<<"$metrics"
            log "canary $agent: error rate $rate, p99 ${p99}s"
            if awk -v r="$rate" -v m="$max_error_rate" 'BEGIN { exit !(r > m) }'; then
                reason="canary $agent: error rate $rate above $max_error_rate"
                return 1
            fi
            if [[ "$p99" == inf ]] || awk -v p="$p99" -v m="$max_p99" 'BEGIN { exit !(p > m) }'; then
                reason="canary $agent: p99 ${p99}s above ${max_p99}s"
                return 1
            fi
        done
        ((SECONDS >= until)) && return 0
        sleep "$poll"
    done
}

# The configuration of a phase as compose resolves it: what makes a re-run a no-op.
fingerprint() {
    compose --profile "$1" config | sha256sum | cut -d' ' -f1
}

# Keeps the deployment a phase just reached, for the next rollback.
save_good() {
    local name="$1" key="$2" dir="$state_dir/last-good" sub
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp/deploy" "$dir.tmp/config"
    cp "$ROOT/docker-compose.yml" "$dir.tmp/"
    for sub in generated prometheus otel grafana; do
        if [[ -d "$ROOT/deploy/$sub" ]]; then cp -R "$ROOT/deploy/$sub" "$dir.tmp/deploy/"; fi
    done
    cp -R "$ROOT/config/mesh" "$dir.tmp/config/"
    # Secrets are not copied: a rollback mounts the ones in force.
    ln -s "$ROOT/deploy/secrets" "$dir.tmp/deploy/secrets"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    echo "$key" >"$state_dir/$name.applied"
}

# rollback PHASE SERVICE...: puts the services back as the phase's last deployment had them,
# or removes them when the phase was never deployed.
rollback() {
    local name="$1" dir="$state_dir/last-good"
    shift
    if [[ -f "$state_dir/$name.applied" && -f "$dir/docker-compose.yml" ]]; then
        log "rolling back to the last good configuration: $*"
        compose --from "$dir" up --detach --no-deps "$@" || log "rollback: compose up failed"
    else
        log "rolling back (nothing deployed before: removing): $*"
        compose stop "$@" || log "rollback: compose stop failed"
        compose rm --force "$@" || log "rollback: compose rm failed"
    fi
}

# Ollama runs as 65532 on a read-only root: its model volume is given to that user once,
# outside compose, by a one-shot container that can do nothing but chown.
prepare_models() {
    [[ -f "$state_dir/ollama-models.prepared" ]] && return 0
    log "preparing the Ollama model volume (owner 65532)"
    docker volume create agent-mesh_ollama-models >/dev/null || die "cannot create the model volume"
    docker run --rm --user 0:0 --cap-drop ALL --cap-add CHOWN --network none --read-only \
        --entrypoint chown -v agent-mesh_ollama-models:/models ollama/ollama:0.5.7 65532:65532 /models ||
        die "cannot prepare the model volume"
    touch "$state_dir/ollama-models.prepared"
}

# rollout_settings PHASE: the phase's canary size, watch and thresholds from rollout.env.
rollout_settings() {
    local p="${1^^}" v
    v="CANARY_PERCENT_$p" && canary_percent="${!v:-}"
    [[ "$canary_percent" =~ ^[0-9]+$ ]] || die "$v in $rollout_file: not a whole number; re-render"
    v="CANARY_WATCH_SECONDS_$p" && watch_seconds="${!v:-}"
    [[ "$watch_seconds" =~ ^[0-9]+$ ]] || die "$v in $rollout_file: not a whole number; re-render"
    v="CANARY_MAX_ERROR_RATE_$p" && max_error_rate="${!v:-}"
    [[ "$max_error_rate" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v in $rollout_file: not a number; re-render"
    v="CANARY_MAX_P99_SECONDS_$p" && max_p99="${!v:-}"
    [[ "$max_p99" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v in $rollout_file: not a number; re-render"
}

deploy_phase() {
    local name="$1" key n c s
    local -a services agents=() canary=() rest=() pairs=()
    key="$(fingerprint "$name")"
    mapfile -t services < <(compose --profile "$name" config --services | sort)
    ((${#services[@]})) || die "phase '$name' has no services"
    if [[ -f "$state_dir/$name.applied" && "$(cat "$state_dir/$name.applied")" == "$key" ]] &&
        wait_healthy "${services[@]}"; then
        log "phase '$name' unchanged and healthy: nothing to do"
        return 0
    fi
    if [[ "$name" == infrastructure ]]; then
        prepare_models
        log "phase '$name': starting ${services[*]}"
        compose up --detach "${build[@]}" "${services[@]}" || die "compose up failed for phase '$name'"
        if ! wait_healthy "${services[@]}"; then
            rollback "$name" "${services[@]}"
            die "phase '$name' $reason; rolled back"
        fi
    else
        rollout_settings "$name"
        for s in "${services[@]}"; do [[ "$s" == *-sidecar ]] || agents+=("$s"); done
        n=${#agents[@]}
        c=$(((n * canary_percent + 99) / 100))
        ((c >= 1)) || c=1
        canary=("${agents[@]:0:c}")
        rest=("${agents[@]:c}")
        for s in "${canary[@]}"; do pairs+=("$s" "$s-sidecar"); done
        log "phase '$name': canary ${canary[*]} ($c of $n agents), watched ${watch_seconds}s against error rate $max_error_rate, p99 ${max_p99}s"
        compose up --detach --no-deps "${build[@]}" "${pairs[@]}" ||
            die "compose up failed for the canary of '$name'"
        if ! watch_canary "${canary[@]}"; then
            rollback "$name" "${pairs[@]}"
            die "phase '$name': $reason; rolled back"
        fi
        log "phase '$name': canary healthy; starting the other $((n - c)) agents"
        pairs=()
        for s in "${rest[@]}"; do pairs+=("$s" "$s-sidecar"); done
        if ((${#pairs[@]})); then
            compose up --detach --no-deps "${pairs[@]}" || die "compose up failed for phase '$name'"
        fi
        if ! wait_healthy "${services[@]}"; then
            rollback "$name" "${services[@]}"
            die "phase '$name' $reason; rolled back"
        fi
    fi
    save_good "$name" "$key"
    log "phase '$name' healthy: ${#services[@]} services"
}

# require_earlier PHASE: the phases before PHASE, when this run does not deploy them, must have
# been deployed and be healthy: each phase waits for health before the next (Rule 25).
require_earlier() {
    local q
    local -a services
    for q in "${PHASES[@]}"; do
        [[ "$q" == "$1" ]] && return 0
        [[ -f "$state_dir/$q.applied" ]] ||
            die "phase '$1' needs phase '$q' first, which has not been deployed here (deploy/deploy.sh --env $env_name --phase $q)"
        mapfile -t services < <(compose --profile "$q" config --services | sort)
        wait_healthy "${services[@]}" || die "phase '$1' needs phase '$q' healthy first: $reason"
    done
}

log "environment '$env_name', phases: ${selected[*]}"
require_earlier "${selected[0]}"
for name in "${selected[@]}"; do
    deploy_phase "$name"
done
log "done"
