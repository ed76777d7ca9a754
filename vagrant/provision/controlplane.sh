#!/usr/bin/env bash
# Vagrant provisioner (cp): the control plane as a systemd unit, advertised on the
# private network address given as $1.
set -euo pipefail

ip=${1:?usage: controlplane.sh ADVERTISE_IP}
meshnode=/opt/meshnode/.venv/bin/meshnode
cat >/etc/systemd/system/meshnode-controlplane.service <<UNIT
[Unit]
Description=meshnode control plane
After=network.target

[Service]
ExecStart=$meshnode controlplane run --listen 0.0.0.0:15012 --advertise $ip --data-dir /var/lib/meshnode-cp
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
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
