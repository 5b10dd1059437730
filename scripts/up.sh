#!/usr/bin/env bash
# The README's run command: set up (idempotent), then `switchyard up`: Redis, the cache, the
# small / quantized / large worker tiers and the router on this machine, from the default
# cluster config (services/cli/default.yaml) or `--config FILE`. Ctrl-C stops it (drains first).
# Arguments go to `switchyard up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/switchyard up "$@"
