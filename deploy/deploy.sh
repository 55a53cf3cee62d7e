#!/usr/bin/env bash
# Phased deployment of the agent mesh (Rule 25). Each phase is a compose profile;
# a phase starts only after the one before it is healthy:
#   infrastructure -> critical -> performance -> specialized
set -euo pipefail

readonly PHASES=(infrastructure critical performance specialized)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

usage() {
    cat <<EOF
Usage: deploy/deploy.sh --phase PHASE [--env NAME] [--timeout SECONDS] [--build]

  --phase    infrastructure | critical | performance | specialized | all
  --env      settings from deploy/env/NAME.env (default: local)
  --timeout  seconds to wait for each phase to become healthy (default: 180)
  --build    rebuild the mesh-proxy image before starting sidecars

Starts the services of the phase with 'docker compose up -d' and waits until
each is healthy (or running, for services without a health check). Exits
non-zero, naming the services that failed, if a phase does not come up.
EOF
}

die() {
    echo "deploy: $*" >&2
    exit 1
}

log() {
    printf '%s deploy: %s\n' "$(date -u +%H:%M:%S)" "$*"
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

command -v docker >/dev/null || die "docker is not installed"
docker compose version >/dev/null 2>&1 || die "the docker compose plugin is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (is it running? may this user use it?)"

compose() {
    docker compose --project-name agent-mesh --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" \
        --env-file "$env_file" "$@"
}

# Prints "ok", "wait" or "fail: <reason>" for one container.
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
        unhealthy) echo "wait (unhealthy)" ;;
        *) echo "wait ($health)" ;;
        esac
        ;;
    exited)
        # A one-shot service (restart: "no") is done when it exits 0.
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

# Prints why the container is not ready: the last health probe output and logs.
explain() {
    local service="$1" id="$2"
    echo "--- $service" >&2
    docker inspect --format \
        '{{if .State.Health}}{{range .State.Health.Log}}{{.End}} probe exit {{.ExitCode}}: {{.Output}}{{end}}{{end}}' \
        "$id" 2>/dev/null | tail -n 3 >&2 || true
    compose logs --no-color --tail 20 "$service" >&2 || true
}

wait_for_phase() {
    local name="$1" deadline=$((SECONDS + timeout)) service id state
    local -a services pending failed
    mapfile -t services < <(compose --profile "$name" config --services)
    ((${#services[@]})) || die "phase '$name' has no services"

    while :; do
        pending=()
        failed=()
        for service in "${services[@]}"; do
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
            echo "deploy: phase '$name' failed:" >&2
            printf '  %s\n' "${failed[@]}" >&2
            for service in "${failed[@]}"; do
                service="${service%%:*}"
                explain "$service" "$(compose ps --all --quiet "$service" | head -n 1)"
            done
            return 1
        fi
        if ((${#pending[@]} == 0)); then
            log "phase '$name' healthy: ${services[*]}"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "deploy: phase '$name' not healthy after ${timeout}s:" >&2
            printf '  %s\n' "${pending[@]}" >&2
            for service in "${pending[@]}"; do
                service="${service%% *}"
                id="$(compose ps --all --quiet "$service" | head -n 1)"
                [[ -n "$id" ]] && explain "$service" "$id"
            done
            return 1
        fi
        sleep 2
    done
}

log "environment '$env_name', phases: ${selected[*]}"
for name in "${selected[@]}"; do
    log "starting phase '$name'"
    if ! compose --profile "$name" up --detach "${build[@]}"; then
        die "docker compose up failed for phase '$name'"
    fi
    wait_for_phase "$name" || die "stopping: phase '$name' is not healthy; later phases were not started"
done
log "done"
