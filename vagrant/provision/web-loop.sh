#!/usr/bin/env bash
# demo-web: every 3 s, a plain curl to the api service's VIP (found in `meshnode
# status`), bounded by --max-time; logs the answer (or the failure) to the journal.
set -uo pipefail

meshnode=/usr/bin/meshnode
vip=""
while true; do
    if [ -z "$vip" ]; then
        vip=$($meshnode status -o json 2>/dev/null | python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)
except ValueError:
    sys.exit(0)
print(next((s["vip"] for s in d.get("services", []) if s["name"] == "api"), ""))' || true)
        [ -n "$vip" ] || { echo "web: no VIP for service api yet"; sleep 3; continue; }
        echo "web: service api is $vip:8080"
    fi
    if out=$(curl -sS --max-time 5 "http://$vip:8080/" 2>&1); then
        echo "web: $out"
    else
        echo "web: curl http://$vip:8080/ failed: $out"
    fi
    sleep 3
done
