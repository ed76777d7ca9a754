#!/usr/bin/env bash
# Installs everything the tests need, then runs lint, type checks and the whole
# test suite (the eBPF / netns / lab tests included: run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
bash scripts/typecheck.sh
echo "== pytest"
exec .venv/bin/pytest "$@"
