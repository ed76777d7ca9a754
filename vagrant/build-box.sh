#!/usr/bin/env bash
# Builds the meshnode lab's Vagrant box offline, from Debian's registry only:
# debootstrap bookworm + Debian's kernel (linux-image-amd64) and its matching
# headers, systemd, python3, python3-bpfcc, python3-venv, iproute2, curl,
# openssh-server, sudo, rsync, tcpdump; a `vagrant` user with Vagrant's insecure
# public key (Vagrant swaps it for a generated key on first `vagrant up`).
# The disk is one ext4 filesystem (no partition table, no boot loader): the box
# carries the kernel and initrd and libvirt boots them directly (the box's own
# Vagrantfile sets kernel/initrd/cmd_line).
#
#   vagrant/build-box.sh [--force]
#
# Output: $MESHNODE_BOX_DIR (default /var/cache/meshnode/vagrant-box)/meshnode-bookworm.box,
# added to Vagrant as box "meshnode/bookworm" (provider libvirt).
# Cached: rebuilt only when this script changes (its hash is in the marker) or with
# --force. Needs root, debootstrap, qemu-utils, e2fsprogs, vagrant. About 5 minutes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
box_name=${MESHNODE_BOX_NAME:-meshnode/bookworm}
out=${MESHNODE_BOX_DIR:-/var/cache/meshnode/vagrant-box}
suite=bookworm
disk_size=8G
packages=(
    systemd systemd-sysv dbus udev kmod initramfs-tools
    linux-image-amd64 linux-headers-amd64
    python3 python3-venv python3-dev python3-bpfcc bpftool
    python3-click python3-yaml python3-pyroute2 python3-scapy python3-jinja2
    iproute2 procps psmisc curl ca-certificates
    openssh-server sudo rsync tcpdump less
)

log() { printf '[build-box] %s\n' "$*"; }
die() { printf '[build-box] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts); try: sudo $0 $*"
for tool in debootstrap qemu-img mkfs.ext4 vagrant; do
    command -v "$tool" >/dev/null || die "$tool is missing (vagrant/test.sh installs it from Debian)"
done

force=0
[ "${1:-}" = "--force" ] && force=1

# The mirror apt uses for $suite here (same logic as scripts/build-rootfs.sh):
# never a hard-coded host.
find_mirror() {
    local f
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
mirror=${MESHNODE_DEBIAN_MIRROR:-$(find_mirror | head -1)}
[ -n "$mirror" ] || die "no apt source for Debian $suite in /etc/apt/sources.list{,.d}; set MESHNODE_DEBIAN_MIRROR"

want=$( { sha256sum <"$0"; echo "$mirror"; } | sha256sum | cut -d' ' -f1)
box="$out/meshnode-bookworm.box"
marker="$out/.box-ok"
if [ "$force" = 0 ] && [ -f "$box" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
    if vagrant box list 2>/dev/null | grep -q "^$box_name .*libvirt"; then
        log "up to date: $box (box $box_name)"
        exit 0
    fi
    log "adding the cached $box as $box_name"
    vagrant box add --force --name "$box_name" "$box" >/dev/null
    exit 0
fi

mkdir -p "$out"
work="$out/work"
root="$work/rootfs"
cleanup() {
    local m
    for m in dev/pts dev proc sys; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m" || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
cleanup
mkdir -p "$work"
start=$SECONDS

log "debootstrap $suite (minbase) from $mirror (log: $out/build-box.log)"
if ! debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,ca-certificates \
        "$suite" "$root" "$mirror" >"$out/build-box.log" 2>&1; then
    tail -20 "$out/build-box.log" >&2
    die "debootstrap failed (full log: $out/build-box.log)"
fi

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
# No service may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
# Minimal initrd that still has the virtio drivers (MODULES=most, the default).
mkdir -p "$root/etc/initramfs-tools/conf.d"
echo 'COMPRESS=gzip' >"$root/etc/initramfs-tools/conf.d/compress"

log "installing the kernel, headers, bcc, python and ssh (${#packages[@]} packages and deps)"
if ! chroot "$root" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends ${packages[*]}" >>"$out/build-box.log" 2>&1; then
    tail -20 "$out/build-box.log" >&2
    die "apt-get install in the chroot failed (full log: $out/build-box.log)"
fi
kver=$(chroot "$root" dpkg-query -W -f='${Depends}' linux-image-amd64 | sed -E 's/.*linux-image-([^ ,]+).*/\1/')
[ -f "$root/boot/vmlinuz-$kver" ] || die "no kernel /boot/vmlinuz-$kver in the image"
[ -f "$root/boot/initrd.img-$kver" ] || die "no initrd for $kver in the image"
[ -d "$root/usr/src/linux-headers-$kver" ] || die "no headers for $kver in the image"
log "kernel $kver with matching headers"

# --- configuration -----------------------------------------------------------
rm -f "$root/usr/sbin/policy-rc.d"
# Every VM must get its own machine id (and DHCP identity): leave it empty.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo "meshnode-box" >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 meshnode-box\n::1 localhost ip6-localhost ip6-loopback\n' \
    >"$root/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$root/etc/fstab"

# Network: DHCP on eth0 only (Vagrant's management network); Vagrant configures
# the private network (eth1) itself with a systemd-networkd file.
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=ipv4

[DHCPv4]
UseDomains=yes
EOF
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
# Nothing here needs "network online"; don't let boot wait for it.
chroot "$root" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1
# No DNS in the lab (nothing to resolve): a static resolv.conf.
rm -f "$root/etc/resolv.conf"
echo "nameserver 127.0.0.1" >"$root/etc/resolv.conf"

# SSH: host keys are made per VM at its first boot, not shared by every VM.
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable ssh-host-keys.service ssh.service >/dev/null 2>&1
echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/vagrant.conf"

# The vagrant user: passwordless sudo, Vagrant's insecure public key.
pubkey=""
for k in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
         /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
    [ -f "$k" ] && { pubkey=$k; break; }
done
[ -n "$pubkey" ] || die "cannot find Vagrant's insecure public key (keys/vagrant.pub)"
chroot "$root" useradd -m -s /bin/bash -G sudo vagrant
echo 'vagrant:vagrant' | chroot "$root" chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
# A root password for the serial console when debugging (lab only).
echo 'root:vagrant' | chroot "$root" chpasswd

# Keep it small: apt is never needed inside the lab's VMs.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/tmp/*

for m in dev/pts dev proc sys; do umount -l "$root/$m"; done

# --- the box -------------------------------------------------------------------
boxdir="$work/box"
mkdir -p "$boxdir"
cp "$root/boot/vmlinuz-$kver" "$boxdir/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$boxdir/initrd.img"
chmod 0644 "$boxdir/vmlinuz" "$boxdir/initrd.img"
log "making the ext4 disk ($disk_size, sparse) and converting it to qcow2"
truncate -s "$disk_size" "$work/root.raw"
mkfs.ext4 -q -L root -d "$root" "$work/root.raw"
qemu-img convert -O qcow2 "$work/root.raw" "$boxdir/box.img"
rm -f "$work/root.raw"
size_gb=$(( $(qemu-img info --output=json "$boxdir/box.img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') / 1024 / 1024 / 1024 ))
cat >"$boxdir/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $size_gb}
EOF
cat >"$boxdir/Vagrantfile" <<EOF
# Box Vagrantfile: direct kernel boot (the disk has no boot loader).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    box_dir = File.dirname(__FILE__)
    lv.kernel = File.join(box_dir, "vmlinuz")
    lv.initrd = File.join(box_dir, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 quiet"
    lv.disk_bus = "virtio"
    lv.nic_model_type = "virtio"
  end
end
EOF
echo "$kver" >"$boxdir/kernel-version"
tar -C "$boxdir" -cf "$box.partial" metadata.json Vagrantfile box.img vmlinuz initrd.img kernel-version
mv "$box.partial" "$box"
printf '%s\n' "$want" >"$marker"
log "built $box ($(du -h "$box" | cut -f1)) in $((SECONDS - start)) s"
vagrant box add --force --name "$box_name" "$box" >/dev/null
log "added box $box_name"
