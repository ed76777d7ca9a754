#!/usr/bin/env bash
# Installs everything meshnode needs on a Debian 12 machine: system packages
# (bcc, bpftool, iproute2, kernel headers, test clients) and a Python virtualenv
# in .venv with meshnode installed in it. Safe to run again.
#
#   scripts/setup.sh          runtime + lab demo
#   scripts/setup.sh --test   also the test tools (pytest, ruff, mypy, tcpdump, ...)
set -euo pipefail

cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh installs system packages and needs root (try: sudo $0 $*)" >&2
    exit 1
fi

pkgs=(python3 python3-venv python3-dev python3-bpfcc bpftool iproute2 iptables procps psmisc
      curl ca-certificates)
if [ "$want_test" = 1 ]; then
    pkgs+=(tcpdump socat haproxy stunnel4 nginx iperf3 wrk postgresql debootstrap systemd-container dnsperf)
    # the console's browser test, the metrics test's real Prometheus
    pkgs+=(chromium chromium-driver prometheus)
    # scripts/build-deb.sh checks the package against Debian's own python3 modules
    pkgs+=(python3-click python3-yaml python3-pyroute2 python3-scapy python3-jinja2)
fi
# Kernel headers: bcc compiles our programs at run time against them.
kver=$(uname -r)
if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    pkgs+=("linux-headers-$kver")
else
    pkgs+=(linux-headers-amd64)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc needs /lib/modules/$(uname -r)/build. When no headers exist for the running
# kernel (a custom or cloud kernel), fall back to Debian's newest headers package,
# which is enough for socket and cgroup programs.
moddir="/lib/modules/$kver"
if [ ! -e "$moddir/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$hdr" ]; then
        echo "no kernel headers found under /usr/src; install linux-headers-amd64" >&2
        exit 1
    fi
    common="${hdr%-amd64}-common"
    mkdir -p "$moddir"
    ln -sfn "$hdr" "$moddir/build"
    ln -sfn "$common" "$moddir/source"
    log "no headers for kernel $kver: linked $moddir/build -> $hdr (fallback for bcc)"
fi

# The bpf filesystem, for the maps the agent pins for ztunnel.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf
    log "mounted bpffs at /sys/fs/bpf"
fi

# Python: Debian's interpreter, so that its bcc module matches; the virtualenv
# sees only bcc from the system site-packages (through a link), nothing else.
py=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$py" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# Strict editable mode: the install is a tree of links to the checkout's files, a
# real package tree that mypy and import-linter can read (the top-level folders
# are mapped into the meshnode namespace; see pyproject.toml). A new module needs
# this script (or `make install`) to run again.
extras=controlplane
[ "$want_test" = 1 ] && extras=controlplane,dev,bench,fuzz
.venv/bin/python -m pip install -q -e ".[$extras]" --config-settings editable_mode=strict
.venv/bin/python -c 'import bcc, meshnode.cli.main' || { echo "meshnode did not import after install" >&2; exit 1; }
log "ready: $(pwd)/.venv/bin/meshnode"
