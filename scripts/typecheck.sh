#!/usr/bin/env bash
# mypy cannot follow setuptools' editable-install import hook, so it would see
# every `meshnode.*` import as Any. Give it a real package tree instead: a
# temporary `meshnode/` whose subpackages are links to the top-level folders.
set -euo pipefail
cd "$(dirname "$0")/.."
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir "$shim/meshnode"
cp meshnode/*.py "$shim/meshnode/"
for d in cli ztunnel nodeagent bpf controlplane bench; do
    ln -s "$(pwd)/$d" "$shim/meshnode/$d"
done
touch "$shim/meshnode/py.typed"
cd "$shim"
"$OLDPWD/.venv/bin/mypy" --config-file "$OLDPWD/pyproject.toml" -p meshnode "$@"
