#!/usr/bin/env bash
# Vagrant step (after `meshnode enroll`): a demo workload as a systemd unit, meshed
# with `meshnode workload add --systemd-unit`.
#   workload.sh api   demo-api: HTTP server on :8080 (service api)
#   workload.sh web   demo-web: curl loop to the api service VIP (service web)
set -euo pipefail

src=/opt/meshnode
py="/usr/bin/env PYTHONPATH=/usr/lib/meshnode/python /usr/bin/python3"  # the package's demo
meshnode=/usr/bin/meshnode
role=${1:?usage: workload.sh api|web}

case "$role" in
api)
    unit=demo-api.service name=api port=8080
    cat >/etc/systemd/system/$unit <<UNIT
[Unit]
Description=meshnode demo: the api service (HTTP :8080)
# Before the agent: at boot the agent resolves --systemd-unit workloads to their
# cgroups once when it starts; a unit started after it stays unmeshed (see README).
After=network.target
Before=meshnode-agent.service

[Service]
ExecStart=$py -m meshnode.lab.demo server --port 8080 --name api
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
    ;;
web)
    unit=demo-web.service name=web port=9090
    cat >/etc/systemd/system/$unit <<UNIT
[Unit]
Description=meshnode demo: the web client (curl to the api service VIP every 3 s)
# Before the agent: at boot the agent resolves --systemd-unit workloads to their
# cgroups once when it starts; a unit started after it stays unmeshed (see README).
After=network.target
Before=meshnode-agent.service

[Service]
ExecStart=$src/vagrant/provision/web-loop.sh
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
    ;;
*) echo "unknown workload $role (api or web)" >&2; exit 2 ;;
esac
systemctl daemon-reload
systemctl enable --now "$unit"
if $meshnode workload ls 2>/dev/null | grep -qw "$name"; then
    echo "[workload] $name is meshed already"
else
    out=$($meshnode workload add "$name" --service "$name" --port "$port" --systemd-unit "$unit")
    echo "[workload] $out"
fi
