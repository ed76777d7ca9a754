#!/usr/bin/env bash
# Vagrant provisioner (every VM): install the meshnode Debian package that
# vagrant/test.sh built on the host (scripts/build-deb.sh --out vagrant/.cache/deb)
# and rsynced here with the checkout. Offline: the box carries the package's Depends
# (vagrant/build-box.sh), so apt fetches nothing.
set -euo pipefail

src=${MESHNODE_SRC:-/opt/meshnode}
log() { printf '[provision %s] %s\n' "$(hostname)" "$*"; }

debs=("$src"/vagrant/.cache/deb/meshnode_*.deb)
[ -f "${debs[0]}" ] || { echo "no meshnode package in $src/vagrant/.cache/deb: run scripts/build-deb.sh --out vagrant/.cache/deb on the host (vagrant/test.sh does)" >&2; exit 1; }
[ ${#debs[@]} -eq 1 ] || { echo "more than one package in $src/vagrant/.cache/deb: ${debs[*]}" >&2; exit 1; }
start=$SECONDS
log "apt install ${debs[0]##*/}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Use-Pty=0 "${debs[0]}" \
    | sed -n 's/^meshnode: /  /p'
log "meshnode $(dpkg-query -W -f='${Version}' meshnode) installed in $((SECONDS - start)) s"
