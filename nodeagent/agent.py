"""The node agent: loads the BPF programs and keeps their maps equal to the
node's workloads and the mesh's services, keeps the workloads' certificates
fresh, and runs ztunnel as a separate process, handing it snapshots.

Signals: SIGHUP re-reads the node config and applies it; SIGTERM stops
ztunnel (which drains), detaches the BPF programs and exits."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from meshnode.controlplane.ca import write_file_atomic
from meshnode.nodeagent.certs import CaClient, CertFiles, CertManager, LocalCa
from meshnode.nodeagent.config import NodeConfig, NodeConfigError, load_node_config
from meshnode.nodeagent.snapshot import (
    assign_workload_ids,
    capture_destinations,
    node_resources,
    strict_ports,
    ztunnel_snapshot,
)

log = logging.getLogger("meshnode.nodeagent")

ADMIN_URL = "http://127.0.0.1:15000"
RENEW_CHECK_EVERY = 60.0


class AgentError(Exception):
    pass


class Agent:
    def __init__(self, config_path: Path, ca: CaClient | None = None) -> None:
        self.config_path = config_path
        self.cfg = load_node_config(config_path)
        if ca is None:
            if not self.cfg.ca_dir:
                raise AgentError("node config names no CA (ca_dir); enroll the node first")
            ca = LocalCa(Path(self.cfg.ca_dir))
        self.certs = CertManager(self.cfg.state_dir / "certs", ca)
        self.ids: dict[str, int] = self._load_ids()
        self.bpf: Any = None
        self.ztunnel: subprocess.Popen[bytes] | None = None
        self._wake = threading.Event()
        self._reload = False
        self._stop = False
        self._ztunnel_failures = 0
        self._next_ztunnel_start = 0.0

    # -- paths -----------------------------------------------------------------

    @property
    def snapshot_path(self) -> Path:
        return self.cfg.state_dir / "ztunnel-snapshot.json"

    @property
    def status_path(self) -> Path:
        return self.cfg.state_dir / "agent-status.json"

    def _load_ids(self) -> dict[str, int]:
        try:
            data = json.loads((self.cfg.state_dir / "workload-ids.json").read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError):
            return {}

    # -- applying config ---------------------------------------------------------

    def apply(self, cfg: NodeConfig) -> None:
        from meshnode.bpf.cgroups import cgroup_id

        self.ids = assign_workload_ids(self.ids, [w.name for w in cfg.workloads])
        write_file_atomic(cfg.state_dir / "workload-ids.json",
                          json.dumps(self.ids).encode(), 0o644)
        certs: dict[str, CertFiles] = {}
        for w in cfg.workloads:
            certs[w.name] = self.certs.ensure(w.identity(cfg.trust_domain))
        bundle = self.certs.bundle_path()
        snap = ztunnel_snapshot(cfg, self.ids, certs, str(bundle))
        write_file_atomic(self.snapshot_path, json.dumps(snap, indent=1).encode(), 0o644)
        members: dict[int, int] = {}
        cgroup_ids: dict[str, int] = {}
        for w in cfg.workloads:
            try:
                cgroup_ids[w.name] = cgroup_id(Path(w.cgroup))
            except OSError as exc:
                log.error("workload %s: cgroup %s is not usable (%s); its connections are not "
                          "meshed until it exists", w.name, w.cgroup, exc.strerror)
                continue
            members[cgroup_ids[w.name]] = self.ids[w.name]
        strict = {(cgroup_ids[name], port) for name, port in strict_ports(cfg, node_resources(cfg))
                  if name in cgroup_ids}
        # Order matters for live traffic: ztunnel must know a workload before the
        # kernel starts sending it that workload's connections.
        self._signal_ztunnel(cfg.version)
        self.bpf.sync_destinations(capture_destinations(cfg))
        self.bpf.sync_workloads(members)
        self.bpf.sync_strict(strict)
        self.cfg = cfg
        log.info("config version %d applied: %d workloads, %d services, %d capture "
                 "destinations, %d STRICT ports", cfg.version, len(cfg.workloads),
                 len(cfg.services), len(capture_destinations(cfg)), len(strict))

    def renew_certificates(self) -> None:
        renewed = [
            w for w in self.cfg.workloads
            if self.certs.needs_renewal(self.certs.files(w.identity(self.cfg.trust_domain)))
        ]
        if renewed:
            log.info("renewing certificates of %s", ", ".join(w.name for w in renewed))
            self.apply(self.cfg)

    # -- ztunnel -------------------------------------------------------------------

    def _ztunnel_cmd(self) -> list[str]:
        return [sys.executable, "-m", "meshnode.cli.main", "ztunnel", "run",
                "--snapshot", str(self.snapshot_path), *self.cfg.ztunnel_args]

    def start_ztunnel(self) -> None:
        logf = open(self.cfg.state_dir / "ztunnel.log", "ab")  # noqa: SIM115 (child owns it)
        self.ztunnel = subprocess.Popen(self._ztunnel_cmd(), stdout=logf, stderr=logf,
                                        stdin=subprocess.DEVNULL)
        logf.close()
        log.info("ztunnel started, pid %d", self.ztunnel.pid)

    def _signal_ztunnel(self, version: int) -> None:
        if self.ztunnel is None or self.ztunnel.poll() is not None:
            return
        self.ztunnel.send_signal(signal.SIGHUP)
        self.wait_ztunnel_version(version, timeout=10)

    def ztunnel_version(self) -> int | None:
        try:
            with urllib.request.urlopen(f"{ADMIN_URL}/config_dump", timeout=2) as resp:
                return int(json.load(resp)["state"]["version"])
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            return None

    def wait_ztunnel_version(self, version: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ztunnel is not None and self.ztunnel.poll() is not None:
                return False
            current = self.ztunnel_version()
            if current is not None and current >= version:
                return True
            time.sleep(0.05)
        log.warning("ztunnel did not confirm config version %d within %.0fs", version, timeout)
        return False

    def supervise_ztunnel(self) -> None:
        """Restart ztunnel if it died, with exponential back-off."""
        if self.ztunnel is None or self.ztunnel.poll() is None:
            return
        now = time.monotonic()
        if now < self._next_ztunnel_start:
            return
        self._ztunnel_failures += 1
        delay = min(30.0, 0.5 * 2 ** self._ztunnel_failures)
        log.error("ztunnel exited with status %s; restarting (attempt %d, next back-off %.1fs); "
                  "see %s", self.ztunnel.returncode, self._ztunnel_failures, delay,
                  self.cfg.state_dir / "ztunnel.log")
        self._next_ztunnel_start = now + delay
        self.start_ztunnel()
        if self.wait_ztunnel_version(self.cfg.version, timeout=15):
            self._ztunnel_failures = 0

    def stop_ztunnel(self, timeout: float = 15.0) -> None:
        if self.ztunnel is None or self.ztunnel.poll() is not None:
            return
        self.ztunnel.terminate()
        try:
            self.ztunnel.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("ztunnel did not stop within %.0fs; killing it", timeout)
            self.ztunnel.kill()
            self.ztunnel.wait()

    def write_status(self, ready: bool) -> None:
        status = {
            "ready": ready,
            "version": self.cfg.version,
            "pid": os.getpid(),
            "ztunnel_pid": self.ztunnel.pid if self.ztunnel else None,
            "workload_ids": self.ids,
        }
        write_file_atomic(self.status_path, json.dumps(status).encode(), 0o644)

    # -- lifecycle -------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True
        self._wake.set()

    def run(self) -> None:
        from meshnode.bpf.loader import MeshBpf

        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.bpf = MeshBpf(Path(self.cfg.bpf_pin_dir))
        self.bpf.load()
        self.bpf.detach_stale(Path(self.cfg.cgroup_parent))
        self.bpf.attach(Path(self.cfg.cgroup_parent))
        log.info("BPF programs attached at %s", self.cfg.cgroup_parent)
        try:
            self.apply(self.cfg)
            self.start_ztunnel()
            if not self.wait_ztunnel_version(self.cfg.version, timeout=30):
                raise AgentError(f"ztunnel did not become ready; see "
                                 f"{self.cfg.state_dir / 'ztunnel.log'}")
            self.write_status(ready=True)
            log.info("node %s ready (config version %d)", self.cfg.name, self.cfg.version)
            last_renew_check = time.monotonic()
            while not self._stop:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                if self._reload and not self._stop:
                    self._reload = False
                    self._reload_config()
                self.supervise_ztunnel()
                if time.monotonic() - last_renew_check > RENEW_CHECK_EVERY:
                    last_renew_check = time.monotonic()
                    self.renew_certificates()
        finally:
            self.write_status(ready=False)
            self.stop_ztunnel()
            self.bpf.detach()
            log.info("node agent stopped; BPF programs detached")

    def _reload_config(self) -> None:
        try:
            cfg = load_node_config(self.config_path)
        except NodeConfigError as exc:
            log.error("config not reloaded, keeping version %d: %s", self.cfg.version, exc)
            return
        self.apply(cfg)
        self.write_status(ready=True)
