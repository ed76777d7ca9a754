"""An enrolled node: its enrollment files (written by `meshnode enroll`), its
local workload registry (`meshnode workload add`), and the control-plane
client that watches the node's slice of the mesh and signs its workloads'
certificates. The last slice is kept on disk, so the node keeps working --
and restarts -- while the control plane is away."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshnode.core import api
from meshnode.core.constants import BPF_PIN_DIR
from meshnode.core.contracts import ContractError, NodeSlice, SliceUnchanged, parse_slice_answer
from meshnode.core.cpclient import ClientError, NodeClient
from meshnode.core.errors import MeshnodeError
from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import SpiffeId, controlplane_uri
from meshnode.nodeagent.config import PROXY_SLICE_CGROUP, LocalWorkload, NodeConfig
from meshnode.nodeagent.enroll import NodeLayout

log = logging.getLogger("meshnode.nodeagent.cp")


class EnrollmentError(MeshnodeError):
    pass


class ControlPlaneError(MeshnodeError):
    """The control plane refused or could not be reached; the message says which."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Enrollment:
    name: str
    zone: str
    ip: str
    trust_domain: str
    control_planes: tuple[str, ...]
    cgroup_parent: str
    state_dir: Path
    config_dir: Path
    # The proxy's cgroup, relative to the cgroup2 mount: only it may bind the
    # delivery address and the proxy's ports (the bind guard). Default: the slice
    # the meshnode-ztunnel unit runs in.
    proxy_cgroup: str = PROXY_SLICE_CGROUP
    # Where the agent pins its BPF programs and maps (one per node on a host that
    # runs several, like the lab).
    bpf_pin_dir: str = BPF_PIN_DIR
    # Mesh workloads' DNS goes to the node proxy's mesh DNS (docs/dns.md).
    dns_capture: bool = True

    @property
    def files(self) -> NodeLayout:
        """Where the node's key, certificate, bundle and registry live (the
        layout `meshnode enroll` wrote)."""
        return NodeLayout(self.config_dir, self.state_dir)


def load_enrollment(config_dir: Path) -> Enrollment:
    path = config_dir / "node.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EnrollmentError(
            f"{path} does not exist: this node is not enrolled; run "
            "`meshnode enroll --cp URL --token TOKEN`"
        ) from None
    except (OSError, ValueError) as exc:
        raise EnrollmentError(f"cannot read {path}: {exc}") from None
    try:
        return Enrollment(
            name=doc["name"],
            zone=doc.get("zone", ""),
            ip=doc.get("ip", ""),
            trust_domain=doc["trust_domain"],
            control_planes=tuple(doc["control_planes"]),
            cgroup_parent=doc["cgroup_parent"],
            state_dir=Path(doc.get("state_dir", "/var/lib/meshnode")),
            config_dir=config_dir,
            proxy_cgroup=str(doc.get("proxy_cgroup") or PROXY_SLICE_CGROUP),
            bpf_pin_dir=str(doc.get("bpf_pin_dir") or BPF_PIN_DIR),
            dns_capture=doc.get("dns_capture", True) is not False,
        )
    except (KeyError, TypeError) as exc:
        raise EnrollmentError(
            f"{path}: missing or bad field {exc}; re-enroll with --force"
        ) from None


# -- local workloads -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """One entry of workloads.json: what `meshnode workload add` recorded."""

    name: str
    service: str
    port: int
    namespace: str = "default"
    version: str = ""
    systemd_unit: str = ""
    cgroup: str = ""
    pid: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "service": self.service,
            "port": self.port,
            "namespace": self.namespace,
        }
        for k in ("version", "systemd_unit", "cgroup"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.pid:
            d["pid"] = self.pid
        return d


def load_workloads(path: Path) -> list[WorkloadSpec]:
    try:
        items = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise EnrollmentError(f"cannot read {path}: {exc}") from None
    out = []
    for i, w in enumerate(items):
        try:
            out.append(
                WorkloadSpec(
                    name=w["name"],
                    service=w["service"],
                    port=int(w["port"]),
                    namespace=w.get("namespace", "default"),
                    version=w.get("version", ""),
                    systemd_unit=w.get("systemd_unit", ""),
                    cgroup=w.get("cgroup", ""),
                    pid=int(w.get("pid", 0)),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EnrollmentError(f"{path}: workload {i}: bad field {exc}") from None
    return out


def save_workloads(path: Path, workloads: list[WorkloadSpec]) -> None:
    write_file_atomic(path, json.dumps([w.to_dict() for w in workloads], indent=1).encode(), 0o644)


def resolve_cgroup(spec: WorkloadSpec, cgroup_root: Path) -> Path:
    """The workload's cgroup v2 directory, from whichever way it was named."""
    if spec.cgroup:
        p = Path(spec.cgroup)
        return p if p.is_absolute() else cgroup_root / p
    if spec.systemd_unit:
        try:
            out = subprocess.run(
                ["systemctl", "show", "-p", "ControlGroup", "--value", spec.systemd_unit],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EnrollmentError(f"cannot ask systemd about {spec.systemd_unit}: {exc}") from None
        rel = out.stdout.strip()
        if out.returncode != 0 or not rel:
            raise EnrollmentError(
                f"systemd unit {spec.systemd_unit} has no cgroup (is it "
                "running? `systemctl status " + spec.systemd_unit + "`)"
            )
        return cgroup_root / rel.lstrip("/")
    if spec.pid:
        try:
            for line in Path(f"/proc/{spec.pid}/cgroup").read_text().splitlines():
                if line.startswith("0::"):
                    return cgroup_root / line[3:].lstrip("/")
        except OSError:
            raise EnrollmentError(f"process {spec.pid} does not exist") from None
        raise EnrollmentError(f"process {spec.pid} has no cgroup v2 membership")
    raise EnrollmentError(f"workload {spec.name}: give a systemd unit, a cgroup or a pid")


# -- the control-plane client ------------------------------------------------------------


class CpClient:
    """HTTPS with the node's certificate; the server must chain to the mesh
    trust bundle and carry the control plane's SPIFFE ID. Several control
    planes (replicas) are tried in order; the last good one is tried first."""

    def __init__(self, enrollment: Enrollment, timeout: float = 10.0) -> None:
        self.e = enrollment
        self.timeout = timeout
        self._client = NodeClient(
            enrollment.control_planes,
            enrollment.files.bundle,
            enrollment.files.cert,
            enrollment.files.key,
            controlplane_uri(enrollment.trust_domain),
            timeout,
        )
        self.last_bundle: bytes | None = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float | None = None,
        keep: bool = False,
    ) -> Any:
        try:
            return self._client.request(method, path, body, timeout or self.timeout, keep)
        except ClientError as exc:
            raise ControlPlaneError(exc.message, exc.status) from None
        except OSError as exc:  # the certificate or bundle file
            raise ControlPlaneError(f"cannot read the node's TLS files: {exc}") from None

    def close(self) -> None:
        """Close the watch's kept connection (from the watch thread)."""
        self._client.close()

    # -- the calls ------------------------------------------------------------------------

    def watch(self, since: int, beat: float, on_answer: Callable[[Any], bool]) -> None:
        """Stream the node's slice from `since` (docs/protocol.md): each answer, as
        decoded JSON, goes to `on_answer` until it returns False or the stream ends.
        The control plane says ``unchanged`` at least every `beat` seconds; silence
        for `beat` + 15 s is a lost connection (ControlPlaneError)."""

        def line(raw: bytes) -> bool:
            try:
                doc = json.loads(raw)
            except ValueError as exc:
                raise ContractError(
                    f"the control plane sent a line that is not JSON: {exc}"
                ) from None
            return on_answer(doc)

        try:
            self._client.stream(
                f"{api.NODE_CONFIG}?since={since}&wait={int(beat)}&endpoints=1&stream=1",
                line,
                idle=beat + 15,
            )
        except ClientError as exc:
            raise ControlPlaneError(exc.message, exc.status) from None
        except OSError as exc:  # the certificate or bundle file
            raise ControlPlaneError(f"cannot read the node's TLS files: {exc}") from None

    def register_workload(self, w: WorkloadSpec) -> None:
        self.request(
            "POST",
            api.NODE_WORKLOADS,
            {
                "name": w.name,
                "namespace": w.namespace,
                "service": w.service,
                "port": w.port,
                "version": w.version,
            },
        )

    def delete_workload(self, name: str) -> None:
        self.request("DELETE", api.path(api.NODE_WORKLOAD, name=name))

    # CaClient
    def sign(self, csr_pem: bytes, identity: SpiffeId) -> bytes:
        doc = self.request(
            "POST",
            api.NODE_CERTIFICATES,
            {
                "csr": csr_pem.decode(),
                "namespace": identity.namespace,
                "service_account": identity.service_account,
            },
        )
        if doc.get("trust_bundle"):
            self.last_bundle = doc["trust_bundle"].encode()
        return str(doc["certificate"]).encode()

    def trust_bundle(self) -> bytes:
        if self.last_bundle is None:
            self.last_bundle = self.e.files.bundle.read_bytes()
        return self.last_bundle


# -- the node's slice, watched -----------------------------------------------------------


@dataclass
class SliceStore:
    """The last slice from the control plane (a NodeSlice of
    meshnode.core.contracts), with the incremental answers folded in; on disk."""

    path: Path
    slice: NodeSlice | None = None
    full_wanted: bool = False  # ask the control plane for a full slice next

    @property
    def revision(self) -> int:
        """The revision to watch from: 0 (= send a full slice) when there is none."""
        return 0 if self.slice is None or self.full_wanted else self.slice.revision

    @property
    def doc(self) -> dict[str, Any]:
        """The slice in its JSON form; {} before the first one."""
        return self.slice.to_json() if self.slice is not None else {}

    def load(self) -> bool:
        try:
            text = self.path.read_text()
        except OSError:
            return False
        try:
            self.slice = NodeSlice.from_json(json.loads(text), str(self.path))
        except ValueError as exc:  # not JSON, or not a slice of this version
            log.warning("ignoring the saved control-plane slice (%s); waiting for a full one", exc)
            return False
        return True

    def save(self) -> None:
        write_file_atomic(self.path, json.dumps(self.doc).encode(), 0o600)

    def ask_full(self) -> None:
        """The next watch asks for a full slice (the last answer made no sense)."""
        self.full_wanted = True

    def apply(self, answer: object) -> bool:
        """Fold a watch answer in; True if anything changed. Raises ContractError
        (a ValueError) when the answer does not follow the slice contract."""
        parsed = parse_slice_answer(answer)
        if isinstance(parsed, SliceUnchanged):
            # Nothing for this node up to that revision (other nodes' changes, or
            # outside its view): watch from there, or it falls off the change log.
            if self.slice is not None and parsed.revision > self.slice.revision:
                self.slice = replace(self.slice, revision=parsed.revision)
            return False
        if isinstance(parsed, NodeSlice):
            self.slice, self.full_wanted = parsed, False
            return True
        if self.slice is None:
            raise ContractError(
                "the control plane sent changes, but there is no slice to "
                "apply them to; asking for a full slice"
            )
        self.slice = self.slice.apply(parsed)
        return True


# Seconds between the control plane's heartbeats on the watch stream.
WATCH_BEAT = 30.0


class CpWatcher(threading.Thread):
    """Streams the node's slice; calls on_change after each change is saved.
    Backs off (1 s doubling to 15 s, jittered; core/api.py) while the control plane is away, and
    says so once, not on every try."""

    def __init__(self, client: CpClient, store: SliceStore, on_change: Callable[[], None]):
        super().__init__(name="cp-watch", daemon=True)
        self.client = client
        self.store = store
        self.on_change = on_change
        self.stop = threading.Event()
        self.reachable: bool | None = None
        self.last_error = ""
        self.last_contact = 0.0
        self._answers = 0  # in the current stream

    def run(self) -> None:
        try:
            self._watch()
        finally:
            self.client.close()

    def _watch(self) -> None:
        backoff = api.WATCH_BACKOFF_FIRST
        while not self.stop.is_set():
            self._answers = 0
            try:
                self.client.watch(self.store.revision, WATCH_BEAT, self._answer)
            except (ControlPlaneError, ValueError, KeyError) as exc:
                if self.reachable is not False:
                    log.warning(
                        "control plane unreachable (%s); serving config revision %d "
                        "from the local snapshot, retrying with back-off",
                        exc,
                        self.store.revision,
                    )
                self.reachable, self.last_error = False, str(exc)
                if isinstance(exc, (ValueError, KeyError)):
                    self.store.ask_full()
                # Jittered: after a control-plane restart the fleet does not come
                # back in one wave.
                pause, backoff = api.backoff_step(backoff)
                self.stop.wait(pause)
                continue
            # The stream ended as it should (the control plane wants the node to
            # ask again: a full slice is due, or it is stopping), or an older control
            # plane answered one long poll: ask again at once -- unless nothing came
            # at all, which is not normal and must not become a busy loop.
            if self._answers:
                backoff = api.WATCH_BACKOFF_FIRST
            else:
                pause, backoff = api.backoff_step(backoff)
                self.stop.wait(pause)

    def _answer(self, answer: Any) -> bool:
        """One answer of the stream: fold it in, save and apply it if it changed
        anything. False (end the stream) once the watcher is stopping."""
        changed = self.store.apply(answer)
        self._answers += 1
        if self.reachable is not True:
            log.info("control plane reachable; config revision %d", self.store.revision)
        self.reachable, self.last_error = True, ""
        self.last_contact = time.time()
        if changed:
            self.store.save()
            self.on_change()
        return not self.stop.is_set()


def node_config_from(
    e: Enrollment,
    slice_doc: NodeSlice | dict[str, Any],
    workloads: list[WorkloadSpec],
    cgroup_root: Path,
    bpf_pin_dir: str,
) -> tuple[NodeConfig, list[str]]:
    """The agent's NodeConfig for an enrolled node (`slice_doc`: the slice, typed
    or as JSON; {} = none yet); problems (a workload whose cgroup cannot be found
    yet) come back as messages, not exceptions."""
    current = (
        slice_doc
        if isinstance(slice_doc, NodeSlice)
        else NodeSlice.from_json(slice_doc)
        if slice_doc
        else None
    )
    problems = []
    local = []
    for w in workloads:
        try:
            cg = resolve_cgroup(w, cgroup_root)
        except EnrollmentError as exc:
            problems.append(str(exc))
            continue
        local.append(
            LocalWorkload(
                name=w.name,
                namespace=w.namespace,
                service_account=w.service,
                service=w.service,
                port=w.port,
                cgroup=str(cg),
            )
        )
    cfg = NodeConfig(
        version=current.revision if current else 0,
        name=e.name,
        ip=e.ip or (current.node.ip if current else ""),
        zone=e.zone,
        trust_domain=e.trust_domain,
        cgroup_parent=e.cgroup_parent,
        proxy_cgroup=e.proxy_cgroup,
        dns_capture=e.dns_capture,
        state_dir=e.state_dir,
        bpf_pin_dir=bpf_pin_dir,
        workloads=local,
        services=[svc.to_json() for svc in current.services] if current else [],
        resources=[r.to_dict() for r in current.resources] if current else [],
        revoked=[r.to_json() for r in current.revoked] if current else [],
    )
    return cfg, problems
