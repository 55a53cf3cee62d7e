#!/usr/bin/env bash
# Makes the Python environment the scenario tests use (tests/src/python.rs): a virtualenv at
# target/pyenv (or $MESH_TEST_VENV) with tests/python/requirements.txt installed. Idempotent:
# an environment that already has the pinned packages is left as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${MESH_TEST_VENV:-target/pyenv}"
reqs="tests/python/requirements.txt"

if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian splits venv support out of python3.
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$venv"
        python3 -m venv "$venv"
    fi
fi
stamp="$venv/.requirements"
if ! cmp -s "$reqs" "$stamp"; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs"
    cp "$reqs" "$stamp"
fi
echo "$(cd "$venv" && pwd)/bin/python"
