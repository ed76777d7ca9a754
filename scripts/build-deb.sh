#!/usr/bin/env bash
# Builds the Debian package: dist/meshnode_<version>_<arch>.deb
#
#   scripts/build-deb.sh [--version V] [--out DIR]
#
# What goes in (docs/packaging.md says why):
#   /usr/bin/meshnode                 a launcher: Debian's python3 with the private tree below
#   /usr/lib/meshnode/python          meshnode, and the Python dependencies Debian 12 does not
#                                     ship at a version we support (vendored wheels)
#   /lib/systemd/system/meshnode-*    agent, ztunnel, bpffs and control-plane units (disabled)
#   /usr/share/man/man8/meshnode.8    every command's --help
#   /usr/share/bash-completion/completions/meshnode
# Python dependencies Debian 12 ships at a supported version come from Debian (Depends).
# Needs scripts/setup.sh --test (the .venv, dpkg-deb, Debian's python3-click and
# friends, used to render and check the package the way it will run). Uses PyPI to
# fetch the vendored wheels. About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

version=""
out="$root/dist"
while [ $# -gt 0 ]; do
    case "$1" in
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--version V] [--out DIR]" >&2; exit 2 ;;
    esac
done

log() { printf '[build-deb] %s\n' "$*"; }
die() { printf '[build-deb] error: %s\n' "$*" >&2; exit 1; }

py=.venv/bin/python
[ -x "$py" ] || die "no .venv; run scripts/setup.sh --test first"
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (package dpkg)"
[ "$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = 3.11 ] \
    || die "the package is built for Debian 12's python3 (3.11); this machine's differs"
[ -n "$version" ] || version=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
arch=$(dpkg --print-architecture)

# The Python dependencies taken from Debian 12, pyproject name -> Debian package. Each
# is at a version inside pyproject's range in bookworm; everything else is vendored
# (bookworm's cryptography 38, uvloop 0.17, aiohttp 3.8, dnspython 2.3 and h2 4.1
# fail our unit suite: docs/packaging.md).
declare -A from_debian=(
    [click]=python3-click
    [pyyaml]=python3-yaml
    [pyroute2]=python3-pyroute2
    [scapy]=python3-scapy
    [jinja2]=python3-jinja2
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage="$work/stage"
lib="$stage/usr/lib/meshnode/python"
mkdir -p "$lib" "$stage/DEBIAN" "$stage/usr/bin" "$stage/usr/share/doc/meshnode" "$out"

log "building the meshnode wheel"
"$py" -m pip wheel -q --no-deps -w "$work/wheel" . >"$work/wheel.log" 2>&1 \
    || { tail -20 "$work/wheel.log" >&2; die "the wheel did not build"; }

# Requirements from pyproject, split into Debian's and ours.
"$py" - "$work" "${!from_debian[@]}" <<'PY'
import re, sys, tomllib
work, debian = sys.argv[1], set(sys.argv[2:])
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()
with open(f"{work}/vendored.txt", "w") as f:
    f.writelines(r + "\n" for r in deps if name(r) not in debian)
with open(f"{work}/debian.txt", "w") as f:
    f.writelines(name(r) + "\n" for r in deps if name(r) in debian)
PY
log "vendoring: $(tr '\n' ' ' <"$work/vendored.txt")"
"$py" -m pip install -q --target "$lib" --no-compile --only-binary=:all: \
    -r "$work/vendored.txt" >"$work/vendor.log" 2>&1 \
    || { tail -20 "$work/vendor.log" >&2; die "vendoring the dependencies failed"; }
"$py" -m pip install -q --target "$lib" --no-compile --no-deps "$work"/wheel/meshnode-*.whl \
    >>"$work/vendor.log" 2>&1 || { tail -20 "$work/vendor.log" >&2; die "installing meshnode failed"; }
rm -rf "$lib/bin"
find "$lib" -name __pycache__ -prune -exec rm -rf {} +

depends=()
while read -r n; do depends+=("${from_debian[$n]}"); done <"$work/debian.txt"
# Whatever pip pulled in of these must not shadow Debian's copy.
for d in "${!from_debian[@]}"; do
    if ls -d "$lib/$d" "$lib/${d}"-*.dist-info >/dev/null 2>&1; then
        die "vendored $d although Debian provides it: a vendored package depends on it"
    fi
done

cat >"$stage/usr/bin/meshnode" <<'SH'
#!/bin/sh
# meshnode: Debian's python3 with the package's private tree first
# (/usr/lib/meshnode/python: meshnode and its vendored dependencies). Exported, so
# the processes meshnode starts (ztunnel workers) find the same tree.
PYTHONPATH=/usr/lib/meshnode/python
export PYTHONPATH
exec /usr/bin/python3 -s -m meshnode.cli.main "$@"
SH
chmod 755 "$stage/usr/bin/meshnode"

log "checking it imports and renders with Debian's python3 and packages"
PYTHONPATH="$lib" /usr/bin/python3 -s -c '
import meshnode.cli.main, meshnode.ztunnel.proxy, meshnode.nodeagent.agent
import meshnode.controlplane.api, meshnode.bpf.loader' \
    || die "meshnode does not import with Debian's python3; install: ${depends[*]} python3-bpfcc"
PYTHONPATH="$lib" /usr/bin/python3 -s packaging/deb/render.py "$stage" "$version"
gzip -9n "$stage/usr/share/man/man8/meshnode.8"

if [ -d deploy/grafana ]; then
    mkdir -p "$stage/usr/share/meshnode/grafana"
    cp deploy/grafana/*.json "$stage/usr/share/meshnode/grafana/"
fi
cp packaging/deb/copyright "$stage/usr/share/doc/meshnode/copyright"
cp packaging/deb/README.Debian "$stage/usr/share/doc/meshnode/README.Debian"
printf 'meshnode (%s) unstable; urgency=medium\n\n  * Built from the meshnode tree.\n\n -- meshnode developers <meshnode@localhost>  %s\n' \
    "$version" "$(date -R)" | gzip -9n >"$stage/usr/share/doc/meshnode/changelog.Debian.gz"

for s in postinst prerm postrm; do install -m 0755 "packaging/deb/$s" "$stage/DEBIAN/$s"; done
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
debian_python=$(IFS=,; echo "${depends[*]}" | sed 's/,/, /g')
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@DEBIAN_PYTHON@/$debian_python/" packaging/deb/control.in >"$stage/DEBIAN/control"

deb="$out/meshnode_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
log "built $deb ($(du -h "$deb" | cut -f1))"
