#!/usr/bin/env bash
# Builds the Debian 12 root filesystem that tests boot with systemd-nspawn
# (tests/support/nspawn.py): one shared, read-only tree; every node gets its own overlay.
#
#   scripts/build-rootfs.sh [DIR]      default DIR: /var/cache/meshnode/rootfs
#
# Idempotent: when DIR/.meshnode-rootfs-ok holds the hash of the same package list,
# suite and mirror, nothing is done. The Debian mirror is the one apt uses on this
# machine (from /etc/apt/sources.list{,.d}), never a hard-coded host.
# Needs root and debootstrap (scripts/setup.sh --test installs it). About 100 s.
set -euo pipefail

dir=${1:-/var/cache/meshnode/rootfs}
suite=bookworm
variant=minbase
# What a Debian 12 node has before meshnode: the meshnode package's Depends are here
# (packaging/deb/control.in and scripts/build-deb.sh's from_debian), because the
# package tests install it with `apt install ./meshnode_*.deb` in a node with no network.
packages=systemd,systemd-sysv,dbus,iproute2,python3,python3-bpfcc,curl,ca-certificates,procps
packages+=,bpftool,python3-click,python3-yaml,python3-pyroute2,python3-scapy,python3-jinja2
marker=.meshnode-rootfs-ok

log() { printf '[build-rootfs] %s\n' "$*"; }
die() { printf '[build-rootfs] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root (try: sudo $0 $*)"
command -v debootstrap >/dev/null || die "debootstrap is missing; run scripts/setup.sh --test"

# The mirror apt uses for $suite itself (not -security / -updates).
find_mirror() {
    local f
    # deb822 (*.sources): a stanza with "Suites: ... bookworm ..." and its "URIs:".
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$suite" '
            function flush() {
                if (uris != "" && types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ")) {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                uris = ""; suites = ""; types = ""
            }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "uris:"   { $1 = ""; uris = $0;   sub(/^ +/, "", uris) }
            tolower($1) == "suites:" { $1 = ""; suites = $0; sub(/^ +/, "", suites) }
            tolower($1) == "types:"  { $1 = ""; types = $0;  sub(/^ +/, "", types) }
            END { if (!found) flush() }
        ' "$f"
    done
    # one-line format: "deb [options] URI SUITE COMPONENTS..."
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$suite" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }
        ' "$f"
    done
}
mirror=$(find_mirror | head -1)
[ -n "$mirror" ] || die "no apt source for Debian $suite in /etc/apt/sources.list{,.d}; cannot pick a mirror"

want=$(printf '%s\n' "$suite" "$variant" "$packages" "$mirror" | sha256sum | cut -d' ' -f1)
if [ -f "$dir/$marker" ] && [ "$(cat "$dir/$marker")" = "$want" ]; then
    log "up to date: $dir"
    exit 0
fi

parent=$(dirname "$dir")
mkdir -p "$parent"
work="$dir.partial"
rm -rf "$work"
trap 'rm -rf "$work"' EXIT
log "debootstrap $suite ($variant) from $mirror into $dir (about 100 s)"
start=$SECONDS
if ! debootstrap --variant="$variant" --include="$packages" "$suite" "$work" "$mirror" \
        >"$parent/build-rootfs.log" 2>&1; then
    tail -20 "$parent/build-rootfs.log" >&2
    die "debootstrap failed (full log: $parent/build-rootfs.log)"
fi

# Every booted node must get its own machine id (and so its own DHCP identity, journal).
: >"$work/etc/machine-id"
rm -f "$work/var/lib/dbus/machine-id"
# A node's hostname comes from systemd-nspawn -M.
rm -f "$work/etc/hostname"
# Keep the image small. apt installs only local .deb files in a node (no lists).
rm -rf "$work"/var/cache/apt/archives/*.deb "$work"/var/lib/apt/lists/*
# Mount points for the binds tests/support/nspawn.py makes (the repository's own path is
# created by systemd-nspawn at boot, in the node's overlay).
mkdir -p "$work/sys/fs/bpf" "$work/lib/modules" "$work/usr/src"
printf '%s\n' "$want" >"$work/$marker"

if [ -e "$dir" ]; then
    log "replacing the outdated rootfs at $dir"
    rm -rf "$dir.old"
    mv "$dir" "$dir.old"
    rm -rf "$dir.old"
fi
mv "$work" "$dir"
trap - EXIT
log "built $dir in $((SECONDS - start)) s"
