#!/usr/bin/env bash
# mypy over the installed package (the editable install is a real tree of links,
# see scripts/setup.sh), run outside the checkout so that the bare meshnode/
# folder does not shadow it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd /
exec "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" -p meshnode "$@"
