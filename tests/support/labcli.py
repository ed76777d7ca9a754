"""The `meshnode` command against one named lab, as the lab tests drive it: each
call is a fresh process with MESHNODE_LAB set, failing loudly with its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

PY = sys.executable
DEMO = (PY, "-m", "meshnode.lab.demo")  # the demo workloads (server, echo-server, idle)


class LabCli:
    def __init__(self, lab: str) -> None:
        self.lab = lab
        self.env = {**os.environ, "MESHNODE_LAB": lab}

    def run(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [PY, "-m", "meshnode.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"meshnode {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def spawn(self, args: Sequence[str], **popen: Any) -> subprocess.Popen[str]:
        """The command in the background (text mode); popen: stdout, stderr, ..."""
        return subprocess.Popen(
            [PY, "-m", "meshnode.cli.main", *args], env=self.env, text=True, **popen
        )

    def out(self, *args: str, check: bool = True, timeout: float = 180) -> str:
        """run(), its stdout."""
        return self.run(*args, check=check, timeout=timeout).stdout

    def add(
        self,
        node: str,
        name: str,
        service: str,
        port: int,
        *cmd: str,
        version: str = "",
        service_port: int | None = None,
    ) -> None:
        """`lab workload add`: cmd, or by default the demo HTTP server on `port`."""
        extra = ["--version", version] if version else []
        if service_port:
            extra += ["--service-port", str(service_port)]
        self.run(
            "lab",
            "workload",
            "add",
            node,
            name,
            "--service",
            service,
            "--port",
            str(port),
            *extra,
            "--",
            *(cmd or (*DEMO, "server", "--port", str(port), "--name", name)),
        )

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.out("lab", "status", "-o", "json")))

    def exec(
        self,
        node: str,
        *cmd: str,
        workload: str | None = None,
        check: bool = True,
        timeout: float = 180,
    ) -> subprocess.CompletedProcess[str]:
        """`lab exec NODE [--workload W] -- CMD...`."""
        wl = ["--workload", workload] if workload else []
        return self.run("lab", "exec", node, *wl, "--", *cmd, check=check, timeout=timeout)

    def vip(
        self, service: str, zone: str | None = None, status: dict[str, Any] | None = None
    ) -> str:
        """The service's VIP; in a multi-zone lab, the one of `zone` (each zone
        allocates its own, and a node calls its zone's)."""
        st = status if status is not None else self.status()
        for s in st["services"]:
            if s["name"] == service and (zone is None or s.get("zone") == zone):
                return str(s["vip"])
        raise AssertionError(f"no service {service}" + (f" in {zone}" if zone else ""))

    def connects(self, node: str, host: str, port: int, timeout: float = 3.0) -> str:
        """Open a plain TCP connection from NODE (its system cgroup: not meshed):
        ``CONNECTED``, or ``FAILED <why>``."""
        probe = (
            "import socket, sys\n"
            "try:\n"
            "    socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))"
            ".close()\n"
            "    print('CONNECTED')\n"
            "except OSError as exc:\n"
            "    print('FAILED', exc)\n"
        )
        out = self.exec(node, PY, "-c", probe, host, str(port), str(timeout)).stdout
        return out.strip()
