#!/usr/bin/env bash
# Vagrant provisioner (every VM): install meshnode from the rsynced checkout with
# the repository's scripts/setup.sh. With vagrant/.cache/wheelhouse present (test.sh
# builds it on the host with `pip wheel`), pip runs offline (--no-index
# --find-links); the box already has the system packages, so apt is not needed
# either. Without the wheelhouse (a public box on a host with internet), setup.sh
# fetches what it needs from Debian and PyPI.
set -euo pipefail

src=${MESHNODE_SRC:-/opt/meshnode}
log() { printf '[provision %s] %s\n' "$(hostname)" "$*"; }
[ -x "$src/scripts/setup.sh" ] || { echo "no meshnode checkout at $src (rsync synced folder)" >&2; exit 1; }

wheels="$src/vagrant/.cache/wheelhouse"
if compgen -G "$wheels/*.whl" >/dev/null; then
    log "installing meshnode offline (wheelhouse: $wheels)"
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheels" PIP_DISABLE_PIP_VERSION_CHECK=1
else
    log "no wheelhouse: installing meshnode from the package registries"
fi
start=$SECONDS
"$src/scripts/setup.sh"
ln -sfn "$src/.venv/bin/meshnode" /usr/local/bin/meshnode
log "meshnode installed in $((SECONDS - start)) s: $("$src/.venv/bin/meshnode" --help >/dev/null && echo ok)"
