#!/usr/bin/env bash
# Vagrant provisioner (cp): the control plane as the package's systemd unit, advertised on the
# private network address given as $1.
set -euo pipefail

ip=${1:?usage: controlplane.sh ADVERTISE_IP}
# The package's unit, with this lab's flags.
echo "MESHNODE_CP_ARGS=\"--listen 0.0.0.0:15012 --advertise $ip\"" >/etc/default/meshnode-controlplane
systemctl daemon-reload
systemctl enable --now meshnode-controlplane.service
for _ in $(seq 1 180); do
    if /opt/meshnode/vagrant/provision/cp-ready.sh; then
        echo "[provision cp] control plane ready on https://$ip:15012"
        exit 0
    fi
    sleep 1
done
journalctl -u meshnode-controlplane --no-pager -n 40 >&2
echo "[provision cp] the control plane did not answer within 180 s" >&2
exit 1
