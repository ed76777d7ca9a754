#!/usr/bin/env bash
# The VM lab end to end, in one command:
#   sudo vagrant/test.sh
#
# 1. installs vagrant, vagrant-libvirt, libvirt, qemu, debootstrap (Debian's registry);
# 2. starts libvirtd if it is not running (systemctl, or by hand inside a network
#    namespace of its own when there is no systemd: the lab's bridges, NAT rules and
#    dnsmasq stay there and vanish with it);
# 3. builds or reuses the box (vagrant/build-box.sh) and builds the Debian package;
# 4. `vagrant up`: cp + node1 + node2, enrolled, demo workloads running;
# 5. checks: `meshnode status` on each node (control plane reachable, BPF programs),
#    demo-web's log shows the greeting for spiffe://cluster.local/ns/default/sa/web,
#    node2's ztunnel access log has the inbound line, a capture on the private
#    network's bridge shows TLS on port 15008 and never the plaintext;
# 6. reboots node1 and checks it comes back enrolled and meshed by itself;
# 7. `vagrant destroy -f` and cleanup; prints how long each phase took.
#
# Environment: MESHNODE_VAGRANT_DRIVER (default here: qemu when /dev/kvm can't be
# used, see below), MESHNODE_NODES (2), MESHNODE_VAGRANT_KEEP=1 (leave the VMs up),
# MESHNODE_VAGRANT_NETNS (name of the namespace, default mnvagrant).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
export VAGRANT_HOME=${VAGRANT_HOME:-/var/cache/meshnode/vagrant.d}
export VAGRANT_DEFAULT_PROVIDER=libvirt
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_NO_COLOR=1
export LIBVIRT_DEFAULT_URI=qemu:///system
# Here /dev/kvm is paravirtual and does not boot stock kernels: software emulation.
export MESHNODE_VAGRANT_DRIVER=${MESHNODE_VAGRANT_DRIVER:-qemu}
export MESHNODE_NODES=${MESHNODE_NODES:-2}
netns=${MESHNODE_VAGRANT_NETNS:-mnvagrant}
state=/run/meshnode-vagrant-test
mkdir -p "$state"

log() { printf '[vagrant-test %s] %s\n' "$(date +%T)" "$*"; }
die() { printf '[vagrant-test] FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (packages, libvirt, debootstrap); try: sudo $0"

# --- phase timing -----------------------------------------------------------------
phases=()
phase_t0=0
phase_name=""
phase() {  # phase NAME: ends the running phase, starts the next
    phase_end
    phase_name=$1
    phase_t0=$SECONDS
    log "=== $phase_name"
}
phase_end() {
    if [ -n "$phase_name" ]; then
        phases+=("$(printf '%-44s %5d s' "$phase_name" $((SECONDS - phase_t0)))")
        log "--- $phase_name: $((SECONDS - phase_t0)) s"
        phase_name=""
    fi
}
report() {
    phase_end
    printf '\nphase timings (driver %s, %s nodes):\n' "$MESHNODE_VAGRANT_DRIVER" "$MESHNODE_NODES"
    local p
    for p in "${phases[@]}"; do printf '  %s\n' "$p"; done
    printf '  %-44s %5d s\n' "total" "$SECONDS"
}

# --- 1. packages (outside the namespace: apt needs the network) -------------------
if [ -z "${MESHNODE_VAGRANT_INNER:-}" ]; then
    trap 'rc=$?; report; [ $rc -eq 0 ] || printf "\nvagrant/test.sh: FAIL (exit %d)\n" $rc' EXIT
    trap 'exit 130' INT TERM
    phase "install host packages"
    pkgs=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86
          qemu-utils debootstrap dnsmasq-base iptables tcpdump rsync openssh-client
          e2fsprogs curl python3)
    missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    vagrant plugin list 2>/dev/null | grep -q vagrant-libvirt \
        || die "vagrant does not see the vagrant-libvirt plugin (Debian package vagrant-libvirt)"

    # The box and the package need the registries too: build them here.
    phase "box (build or reuse)"
    "$here/build-box.sh"

    phase "the Debian package (scripts/build-deb.sh on the host)"
    if [ ! -x "$repo/.venv/bin/python" ]; then
        # A fresh checkout: build-deb.sh vendors from the project's venv.
        log "no .venv yet: scripts/setup.sh --test"
        bash "$repo/scripts/setup.sh" --test >"$state/setup.log" 2>&1 \
            || die "scripts/setup.sh --test failed (log: $state/setup.log)"
    fi
    rm -rf "$here/.cache/deb"
    bash "$repo/scripts/build-deb.sh" --out "$here/.cache/deb" \
        || die "scripts/build-deb.sh failed: the VMs install that package"
    phase_end
    elapsed_before=$SECONDS

    # --- 2. libvirtd ----------------------------------------------------------------
    if virsh -c qemu:///system version >/dev/null 2>&1; then
        log "libvirtd is running: using it"
    elif [ -d /run/systemd/system ]; then
        log "starting libvirtd (systemctl)"
        systemctl start libvirtd.service virtlogd.service
    else
        # No systemd: libvirtd by hand, in a namespace of its own; this script
        # continues inside it (vagrant must reach the VMs on libvirt's bridges).
        log "no systemd and no libvirtd: running the lab in network namespace $netns"
        ip netns list | grep -qw "$netns" || ip netns add "$netns"
        ip netns exec "$netns" ip link set lo up
        trap - EXIT
        set +e
        MESHNODE_VAGRANT_INNER=netns MESHNODE_VAGRANT_T0=$elapsed_before \
            MESHNODE_VAGRANT_PHASES="$(printf '%s\n' "${phases[@]}")" \
            ip netns exec "$netns" "$0" "$@"
        rc=$?
        set -e
        ip netns del "$netns" 2>/dev/null || true
        exit $rc
    fi
    MESHNODE_VAGRANT_INNER=host
else
    # Inside the namespace: carry the phase timings of the outer half over.
    SECONDS=${MESHNODE_VAGRANT_T0:-0}
    while IFS= read -r line; do [ -n "$line" ] && phases+=("$line"); done \
        <<<"${MESHNODE_VAGRANT_PHASES:-}"
fi

started_libvirtd=()
cleanup() {
    local rc=$?
    set +e
    if [ -z "${MESHNODE_VAGRANT_KEEP:-}" ] && [ -d "$here/.vagrant/machines" ]; then
        log "cleanup: vagrant destroy -f"
        (cd "$here" && timeout 300 vagrant destroy -f >"$state/destroy.log" 2>&1) \
            || { log "vagrant destroy failed:"; tail -5 "$state/destroy.log"; }
    fi
    if [ ${#started_libvirtd[@]} -gt 0 ] && [ -z "${MESHNODE_VAGRANT_KEEP:-}" ]; then
        # Networks first (their dnsmasq), then the daemons this script started.
        for n in $(virsh net-list --name 2>/dev/null); do virsh net-destroy "$n" >/dev/null 2>&1; done
        for pid in "${started_libvirtd[@]}"; do kill "$pid" 2>/dev/null; done
        log "cleanup: stopped libvirtd/virtlogd (pids ${started_libvirtd[*]})"
    fi
    report
    [ $rc -eq 0 ] && printf '\nvagrant/test.sh: PASS\n' || printf '\nvagrant/test.sh: FAIL (exit %d)\n' $rc
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$MESHNODE_VAGRANT_INNER" = netns ]; then
    phase "start libvirtd (by hand, netns $netns)"
    mkdir -p /run/libvirt /var/log/libvirt
    # /dev/kvm here is paravirtual and unusable: when libvirt finds it usable but
    # qemu's KVM probe fails, it drops its capability cache and probes qemu again on
    # every API call (seconds each; vagrant up stalls). With the qemu driver, cover
    # it (in this private mount namespace only) with an unreadable empty file.
    if [ "$MESHNODE_VAGRANT_DRIVER" = qemu ] && [ -e /dev/kvm ]; then
        : >"$state/no-kvm"
        chmod 000 "$state/no-kvm"
        mount --bind "$state/no-kvm" /dev/kvm
        rm -f /var/cache/libvirt/qemu/capabilities/*.xml
        # ... and libvirt's per-VM /dev namespace can't copy a bind-mounted node:
        # no per-VM mount namespaces (a qemu.conf for this namespace only).
        cp /etc/libvirt/qemu.conf "$state/qemu.conf"
        echo 'namespaces = []' >>"$state/qemu.conf"
        mount --bind "$state/qemu.conf" /etc/libvirt/qemu.conf
        log "driver qemu: /dev/kvm hidden from this namespace's libvirtd"
    fi
    for d in virtlogd libvirtd; do
        pidf=/run/meshnode-vagrant-test/$d.pid
        /usr/sbin/$d --daemon --pid-file "$pidf" || die "$d did not start"
        for _ in $(seq 1 50); do [ -s "$pidf" ] && break; sleep 0.1; done
        started_libvirtd+=("$(cat "$pidf")")
    done
    for _ in $(seq 1 100); do virsh version >/dev/null 2>&1 && break; sleep 0.2; done
    virsh version >/dev/null || die "libvirtd started but virsh cannot connect (see /var/log/libvirt)"
fi
if ! virsh pool-info default >/dev/null 2>&1; then
    mkdir -p /var/lib/libvirt/images
    virsh pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
fi
virsh pool-start default >/dev/null 2>&1 || true

# --- 4. vagrant up -------------------------------------------------------------------
cd "$here"
if [ -d .vagrant/machines ] && [ -z "${MESHNODE_VAGRANT_KEEP:-}" ]; then
    vagrant destroy -f >/dev/null 2>&1 || true
fi
phase "vagrant up (cp + $MESHNODE_NODES nodes, enrolled)"
if ! vagrant up --provider libvirt >"$state/up.log" 2>&1; then
    tail -60 "$state/up.log"
    die "vagrant up failed (full log: $state/up.log)"
fi
grep -E 'meshnode|workload|provision|enrolled|started' "$state/up.log" | sed 's/^/    /' | tail -40

ssh_cfg=$state/ssh_config
refresh_ssh() { vagrant ssh-config >"$ssh_cfg" 2>/dev/null || die "vagrant ssh-config failed"; }
refresh_ssh
on() {  # on VM COMMAND...: run as root on a VM
    local vm=$1; shift
    ssh -F "$ssh_cfg" -o ConnectTimeout=10 -o LogLevel=ERROR "$vm" sudo "$@"
}
wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 3
    done
    log "ok: $what"
}

# --- 5. checks -------------------------------------------------------------------------
phase "check the mesh"
nodes=()
for i in $(seq 1 "$MESHNODE_NODES"); do nodes+=("node$i"); done
api_node=node2; [ "$MESHNODE_NODES" -ge 2 ] || api_node=node1

check_status() {  # check_status NODE: control plane reachable, agent, ztunnel, BPF programs
    on "$1" /usr/bin/meshnode status -o json | python3 -c '
import json, sys
s = json.load(sys.stdin)
progs = sorted(p["name"] for p in s.get("bpf_programs", []))
ok = (s.get("control_plane_reachable") is True and s.get("agent", {}).get("running")
      and str(s.get("ztunnel", "")).startswith("ready")
      and {"mn_connect4", "mn_sockops"} <= set(progs))
sys.exit(0 if ok else 1)'
}
for n in "${nodes[@]}"; do
    wait_for 180 "$n: control plane reachable, agent and ztunnel up, BPF programs attached" \
        check_status "$n" || { on "$n" /usr/bin/meshnode status || true
                               die "$n: meshnode status is not healthy"; }
    on "$n" /usr/bin/meshnode status | sed "s/^/    $n | /"
done

greeting='hello spiffe://cluster.local/ns/default/sa/web'
web_greets() { on node1 journalctl -u demo-web -o cat --no-pager "$@" | grep -q "$greeting"; }
wait_for 180 "node1 demo-web log shows '$greeting'" web_greets \
    || { on node1 journalctl -u demo-web -o cat --no-pager -n 20 || true
         die "demo-web on node1 never got the greeting through the mesh"; }
on node1 journalctl -u demo-web -o cat --no-pager | grep "$greeting" | tail -2 | sed 's/^/    node1 demo-web | /'

inbound_logged() {
    on "$api_node" journalctl -u meshnode-ztunnel -o cat --no-pager \
        | grep '"direction":"inbound"' | grep -q 'spiffe://cluster.local/ns/default/sa/web'
}
wait_for 60 "$api_node ztunnel access log has the inbound connection from sa/web" inbound_logged \
    || { on "$api_node" journalctl -u meshnode-ztunnel -o cat --no-pager -n 20 || true
         die "no inbound access-log line on $api_node"; }
on "$api_node" journalctl -u meshnode-ztunnel -o cat --no-pager | grep '"direction":"inbound"' \
    | tail -1 | sed "s/^/    $api_node ztunnel | /"

# Capture on the host side of the private network.
phase "capture on the private network"
bridge=$(virsh net-info meshnode-lab | awk '/^Bridge:/ {print $2}')
[ -n "$bridge" ] || die "cannot find the bridge of libvirt network meshnode-lab"
pcap=$state/private.pcap
timeout 15 tcpdump -i "$bridge" -nn -s 0 -U -w "$pcap" 'tcp' 2>"$state/tcpdump.log" || true
total=$(tcpdump -r "$pcap" -nn 2>/dev/null | wc -l)
hbone=$(tcpdump -r "$pcap" -nn 'tcp port 15008' 2>/dev/null | wc -l)
# TLS records (content type 0x17 application data, version 0x0303) on port 15008.
tlsdata=$(tcpdump -r "$pcap" -nn \
    'tcp port 15008 and tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x17 and tcp[((tcp[12:1] & 0xf0) >> 2) + 1:2] = 0x0303' \
    2>/dev/null | wc -l)
plain8080=$(tcpdump -r "$pcap" -nn 'tcp port 8080' 2>/dev/null | wc -l)
marker=$(tcpdump -r "$pcap" -nn -A 2>/dev/null | grep -c -e 'this is api' -e 'hello spiffe' || true)
log "capture on $bridge (15 s): $total TCP packets, $hbone on port 15008 ($tlsdata TLS application-data records), $plain8080 on port 8080, $marker with the plaintext marker"
[ "$hbone" -gt 0 ] && [ "$tlsdata" -gt 0 ] || die "no TLS traffic on port 15008 on the private network"
[ "$plain8080" -eq 0 ] || die "plain traffic to port 8080 on the private network"
[ "$marker" -eq 0 ] || die "the plaintext greeting is visible on the private network"
log "ok: the private network carries TLS on 15008 and no plaintext"

# --- 6. reboot node1 -----------------------------------------------------------------------
phase "reboot node1, back meshed"
boot_before=$(on node1 cat /proc/sys/kernel/random/boot_id)
on node1 systemctl reboot >/dev/null 2>&1 || true
rebooted() {
    local now
    refresh_ssh
    now=$(on node1 cat /proc/sys/kernel/random/boot_id) || return 1
    [ -n "$now" ] && [ "$now" != "$boot_before" ]
}
wait_for 600 "node1 rebooted (new boot id) and reachable over ssh" rebooted \
    || die "node1 did not come back within 600 s"
has_web() {
    on node1 /usr/bin/meshnode status -o json | python3 -c '
import json, sys
sys.exit(0 if "web" in [w["name"] for w in json.load(sys.stdin).get("workloads", [])] else 1)'
}
wait_for 300 "node1 after reboot: status healthy" check_status node1 \
    || { on node1 /usr/bin/meshnode status || true; die "node1 not healthy after reboot"; }
wait_for 120 "node1 after reboot: workload web meshed again" has_web \
    || { on node1 /usr/bin/meshnode status || true
         die "node1 came back without its workload web (agent and demo-web start order?)"; }
on node1 /usr/bin/meshnode status | sed 's/^/    node1 | /'
wait_for 240 "node1 demo-web greets through the mesh again (this boot)" web_greets -b \
    || { on node1 journalctl -b -u demo-web -o cat --no-pager -n 20 || true
         die "demo-web on node1 is not meshed after the reboot"; }
on node1 journalctl -b -u demo-web -o cat --no-pager | grep "$greeting" | tail -1 \
    | sed 's/^/    node1 demo-web (after reboot) | /'

# --- 7. teardown -----------------------------------------------------------------------------
if [ -z "${MESHNODE_VAGRANT_KEEP:-}" ]; then
    phase "vagrant destroy"
    vagrant destroy -f >"$state/destroy.log" 2>&1 || die "vagrant destroy failed (see $state/destroy.log)"
    rm -rf "$here/.vagrant"
    phase_end
else
    log "MESHNODE_VAGRANT_KEEP set: the VMs stay up (cd vagrant && vagrant destroy -f)"
fi
