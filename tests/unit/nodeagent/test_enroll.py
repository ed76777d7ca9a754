"""`meshnode enroll`, the pure parts: token parsing, the pin check against a real
chain from the CA, the answer checks, unit rendering, node.json and the "already
enrolled" decision. Plus the whole command against a real control plane on
loopback when the control-plane server is there (--no-start, temporary dirs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshnode.controlplane.ca import CertificateAuthority
from meshnode.core import pki
from meshnode.core.identity import IdentityError, check_node_name
from meshnode.core.pki import generate_private_key
from meshnode.core.token import TokenError, parse_token
from meshnode.nodeagent import enroll as en
from meshnode.nodeagent import units

PIN_A = "a" * 64
TOKEN = f"mn1.0123abcd.{'5' * 32}.{PIN_A}"


# --- tokens and URLs ------------------------------------------------------------------


def test_parse_token() -> None:
    t = parse_token(f"  {TOKEN}\n")
    assert (t.id, t.secret, t.pin) == ("0123abcd", "5" * 32, PIN_A)
    assert str(t) == TOKEN
    assert "5555" not in repr(t)  # the secret never shows in logs


@pytest.mark.parametrize(
    "bad, says",
    [
        ("", "4 dot-separated parts"),
        ("mn2.0123abcd." + "5" * 32 + "." + PIN_A, "starting 'mn2'"),
        ("mn1.0123abcd." + "5" * 32, "4 dot-separated parts"),
        ("mn1.0123abc." + "5" * 32 + "." + PIN_A, "bad id"),
        ("mn1.0123abcd." + "5" * 31 + "." + PIN_A, "bad secret"),
        ("mn1.0123abcd." + "5" * 32 + "." + "A" * 64, "bad pin"),
        ("mn1.0123abcd." + "x" * 32 + "." + PIN_A, "bad secret"),
    ],
)
def test_parse_token_refuses(bad: str, says: str) -> None:
    with pytest.raises(TokenError, match=says) as err:
        parse_token(bad)
    assert "x" * 32 not in str(err.value)


def test_control_plane_url() -> None:
    assert str(en.ControlPlaneUrl.parse("https://cp.example:443")) == "https://cp.example:443"
    assert str(en.ControlPlaneUrl.parse("198.18.0.1")) == "https://198.18.0.1:15012"
    assert str(en.ControlPlaneUrl.parse("https://[::1]/")) == "https://[::1]:15012"
    for bad in ("http://cp:15012", "https://cp:15012/v1", "https://:15012", "https://cp:99999"):
        with pytest.raises(en.EnrollError):
            en.ControlPlaneUrl.parse(bad)


def test_node_name() -> None:
    assert check_node_name("node-1") == "node-1"
    for bad in ("Node1", "-x", "a.b", "", "x" * 64):
        with pytest.raises(IdentityError, match="not usable"):
            check_node_name(bad)


# --- the pin ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _server_chain(ca: CertificateAuthority) -> list[x509.Certificate]:
    """What a control plane's TLS chain looks like: leaf + intermediate, no root."""
    from meshnode.core.identity import SpiffeId
    from meshnode.core.pki import make_csr

    key = generate_private_key()
    pem = ca.issue_workload_certificate(
        make_csr(key, SpiffeId("cluster.local", "x", "y")), SpiffeId("cluster.local", "x", "y")
    )
    return x509.load_pem_x509_certificates(pem)


def test_pin_found_in_bundle_or_chain(ca: CertificateAuthority) -> None:
    root = ca.root_certificate
    pin = pki.root_pin(root)
    chain = _server_chain(ca)
    assert pki.find_pinned_root([*chain, root], pin, "https://cp:15012") == root
    assert pki.find_pinned_root([root], pin.upper(), "https://cp:15012") == root


def test_pin_mismatch_names_both(ca: CertificateAuthority) -> None:
    root = ca.root_certificate
    with pytest.raises(pki.PinMismatch) as err:
        pki.find_pinned_root([*_server_chain(ca), root], PIN_A, "https://cp:15012")
    msg = str(err.value)
    assert msg == (
        "the control plane at https://cp:15012 is not the one this token was made "
        f"for: expected pin {PIN_A}, got {pki.root_pin(root)}"
    )


def test_pin_without_any_root(ca: CertificateAuthority) -> None:
    chain = _server_chain(ca)
    with pytest.raises(pki.PinMismatch, match="no root certificate at all"):
        pki.find_pinned_root(chain, pki.root_pin(ca.root_certificate), "https://cp:15012")
    with pytest.raises(pki.PinMismatch, match="got no certificates"):
        pki.find_pinned_root([], PIN_A, "https://cp:15012")


def test_pin_of_a_non_root_is_refused(ca: CertificateAuthority) -> None:
    inter = ca.intermediate_certificate
    with pytest.raises(pki.PinMismatch, match="not a self-signed CA"):
        pki.find_pinned_root([inter], pki.root_pin(inter), "https://cp:15012")


# --- the answer -----------------------------------------------------------------------


def _answer(ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey, name: str = "node1") -> dict:
    csr = en.make_node_csr(key, "cluster.local", name)
    if hasattr(ca, "issue_node_certificate"):
        chain = ca.issue_node_certificate(csr, name)
    else:  # an older CA module: build the node certificate like the CA would
        pytest.skip("controlplane/ca.py has no issue_node_certificate")
    return {
        "certificate": chain.decode(),
        "trust_bundle": ca.trust_bundle_pem().decode(),
        "trust_domain": "cluster.local",
        "node": {"name": name, "zone": "zone-a", "ip": "198.18.1.2"},
    }


def test_check_enroll_response(ca: CertificateAuthority) -> None:
    key = generate_private_key()
    res = en.check_enroll_response(
        _answer(ca, key), key, ca.root_certificate, "node1", "https://cp:15012"
    )
    assert (res.name, res.zone, res.ip, res.trust_domain) == (
        "node1",
        "zone-a",
        "198.18.1.2",
        "cluster.local",
    )
    assert res.certificate_pem.count(b"BEGIN CERTIFICATE") == 2


def test_check_enroll_response_refuses(ca: CertificateAuthority) -> None:
    key, other = generate_private_key(), generate_private_key()
    with pytest.raises(en.EnrollError, match="different key"):
        en.check_enroll_response(_answer(ca, key), other, ca.root_certificate, "node1", "u")
    with pytest.raises(en.EnrollError, match="names"):
        en.check_enroll_response(_answer(ca, key, "node2"), key, ca.root_certificate, "node1", "u")
    stranger = CertificateAuthority.create("cluster.local")
    answer = _answer(ca, key)
    answer["trust_bundle"] = stranger.trust_bundle_pem().decode()
    with pytest.raises(en.EnrollError, match="does not chain"):
        en.check_enroll_response(answer, key, ca.root_certificate, "node1", "u")
    answer = _answer(ca, key)
    answer["trust_domain"] = "other.td"
    with pytest.raises(en.EnrollError, match="trust domain"):
        en.check_enroll_response(answer, key, ca.root_certificate, "node1", "u")


def test_csr_is_p256_with_the_node_id() -> None:
    key = generate_private_key()
    csr = x509.load_pem_x509_csr(en.make_node_csr(key, "cluster.local", "node1"))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/node/node1"
    ]


# --- files ------------------------------------------------------------------------------


def _result(ca: CertificateAuthority) -> en.EnrollmentResult:
    key = generate_private_key()
    return en.check_enroll_response(
        _answer(ca, key), key, ca.root_certificate, "node1", "https://198.18.1.1:15012"
    )


def test_write_enrollment_layout(tmp_path: Path, ca: CertificateAuthority) -> None:
    layout = en.NodeLayout(tmp_path / "etc", tmp_path / "state")
    doc = en.write_enrollment(layout, _result(ca), "/sys/fs/cgroup")
    assert doc == {
        "name": "node1",
        "zone": "zone-a",
        "ip": "198.18.1.2",
        "trust_domain": "cluster.local",
        "control_planes": ["https://198.18.1.1:15012"],
        "cgroup_parent": "/sys/fs/cgroup",
        "state_dir": str(tmp_path / "state"),
        "config_dir": str(tmp_path / "etc"),
    }
    assert json.loads(layout.node_json.read_text()) == doc
    assert json.loads(layout.workloads.read_text()) == []
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert (mode(layout.config_dir), mode(layout.key), mode(layout.state_dir)) == (
        0o755,
        0o600,
        0o700,
    )
    assert mode(layout.cert) == mode(layout.bundle) == 0o644
    # workloads.json is the node's own: an existing one survives a re-enrollment.
    layout.workloads.write_text('[{"name": "web"}]')
    en.write_enrollment(layout, _result(ca), "/sys/fs/cgroup")
    assert json.loads(layout.workloads.read_text()) == [{"name": "web"}]


def test_node_document_prefers_what_the_cp_recorded(ca: CertificateAuthority) -> None:
    layout = en.NodeLayout(Path("/etc/meshnode"), Path("/var/lib/meshnode"))
    res = _result(ca)
    assert en.node_document(res, layout, "/x", "zone-b", "10.0.0.1")["zone"] == "zone-a"
    from dataclasses import replace

    bare = replace(res, zone="", ip="")
    doc = en.node_document(bare, layout, "/x", "zone-b", "10.0.0.1")
    assert (doc["zone"], doc["ip"]) == ("zone-b", "10.0.0.1")


def test_already_enrolled_decision(tmp_path: Path, ca: CertificateAuthority) -> None:
    layout = en.NodeLayout(tmp_path / "etc", tmp_path / "state")
    assert en.existing_enrollment(layout) is None
    en.write_enrollment(layout, _result(ca), "/sys/fs/cgroup")
    found = en.existing_enrollment(layout)
    assert found is not None
    assert found.message() == (
        f"already enrolled as node1 with CP https://198.18.1.1:15012 (config in "
        f"{tmp_path / 'etc'}); nothing changed. Use --force to enroll again."
    )
    layout.key.unlink()
    with pytest.raises(en.EnrollError, match="partial enrollment.*node-key.pem.*--force"):
        en.existing_enrollment(layout)
    layout.node_json.write_text("{not json")
    with pytest.raises(en.EnrollError, match="--force"):
        en.existing_enrollment(layout)


# --- units ------------------------------------------------------------------------------


def test_units_render() -> None:
    paths = units.UnitPaths(
        Path("/opt/mn/.venv/bin/meshnode"), Path("/etc/meshnode"), Path("/var/lib/meshnode")
    )
    rendered = units.render_units(paths)
    assert set(rendered) == {units.ZTUNNEL_UNIT, units.AGENT_UNIT, units.BPFFS_UNIT}
    zt, agent = rendered[units.ZTUNNEL_UNIT], rendered[units.AGENT_UNIT]
    assert (
        "ExecStart=/opt/mn/.venv/bin/meshnode ztunnel run --snapshot "
        "/var/lib/meshnode/ztunnel-snapshot.json --workers 0 \\\n"
        "    --peer-socket /run/meshnode/peer.sock $MESHNODE_ZTUNNEL_OPTS\n"
    ) in zt
    assert "EnvironmentFile=-/etc/default/meshnode-ztunnel\n" in zt
    assert "Slice=meshnode-proxy.slice\n" in zt
    assert "After=network-online.target meshnode-bpffs.service meshnode-proxy.slice\n" in agent
    assert "RuntimeDirectory=meshnode\nRuntimeDirectoryMode=0755\n" in zt
    assert "ExecStart=/opt/mn/.venv/bin/meshnode agent run --enrolled /etc/meshnode\n" in agent
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "RestartSec=1",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "LimitNOFILE=1048576",
        "ReadWritePaths=/var/lib/meshnode -/sys/fs/bpf",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_BPF CAP_SYS_ADMIN",
        "Requires=meshnode-bpffs.service",
    ):
        assert f"\n{line}\n" in zt, line
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "LimitMEMLOCK=infinity",
        "Wants=network-online.target meshnode-ztunnel.service meshnode-proxy.slice",
        "ReadWritePaths=/var/lib/meshnode /etc/meshnode -/sys/fs/bpf -/sys/fs/cgroup",
        "CapabilityBoundingSet=CAP_BPF CAP_SYS_ADMIN CAP_NET_ADMIN CAP_PERFMON",
    ):
        assert f"\n{line}\n" in agent, line
    # What would break the agent: cgroupfs or /lib/modules hidden, /sys/fs/bpf read-only.
    for absent in (
        "ProtectControlGroups=yes",
        "ProtectKernelModules=yes",
        "\nProtectKernelTunables=yes",
    ):
        assert absent not in agent
    assert "mount -t bpf" in rendered[units.BPFFS_UNIT]


def test_units_under_home_keep_home_readable() -> None:
    rendered = units.render_units(
        units.UnitPaths(
            Path("/root/mn/.venv/bin/meshnode"), Path("/etc/meshnode"), Path("/var/lib/meshnode")
        )
    )
    assert "\nProtectHome=read-only\n" in rendered[units.AGENT_UNIT]


def test_units_refuse_paths_systemd_would_split() -> None:
    with pytest.raises(ValueError, match="spaces"):
        units.render_units(
            units.UnitPaths(
                Path("/opt/my venv/bin/meshnode"), Path("/etc/meshnode"), Path("/var/lib/meshnode")
            )
        )


def test_install_units(tmp_path: Path) -> None:
    rendered = units.render_units(
        units.UnitPaths(Path("/x/meshnode"), Path("/etc/meshnode"), Path("/var/lib/meshnode"))
    )
    written = units.install_units(tmp_path / "units", rendered, tmp_path / "packaged")
    assert sorted(p.name for p in written) == sorted(rendered)
    for p in written:
        assert p.read_text() == rendered[p.name]
        assert p.stat().st_mode & 0o777 == 0o644


def test_units_the_package_ships_are_left_to_it(tmp_path: Path) -> None:
    """On a node that installed the .deb, enroll writes no copy into /etc/systemd/system
    (and removes one an earlier enroll left), so `apt remove` leaves no unit behind;
    a unit that differs from the packaged one is still written."""
    exe = Path("/usr/bin/meshnode")
    shipped = units.render_package_units(exe)
    assert units.CONTROLPLANE_UNIT in shipped
    packaged, etc = tmp_path / "lib", tmp_path / "etc"
    packaged.mkdir()
    for name, text in shipped.items():
        (packaged / name).write_text(text)
    etc.mkdir()
    (etc / units.AGENT_UNIT).write_text("left by an earlier enroll")
    same = units.render_units(
        units.UnitPaths(exe, Path("/etc/meshnode"), Path("/var/lib/meshnode"))
    )
    written = units.install_units(etc, same, packaged)
    assert all(p.parent == packaged for p in written)
    assert list(etc.iterdir()) == []
    other = units.render_units(units.UnitPaths(exe, Path("/etc/other"), Path("/var/lib/other")))
    written = units.install_units(etc, other, packaged)
    differ = sorted(n for n in other if other[n] != shipped[n])
    assert units.AGENT_UNIT in differ and units.ZTUNNEL_UNIT in differ
    assert sorted(p.name for p in etc.iterdir()) == differ
    assert sorted(p.name for p in written if p.parent == etc) == differ


# --- the command against a real control plane ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    try:
        import meshnode.controlplane.server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no control plane server yet: {exc}")
    data = tmp_path_factory.mktemp("cp")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshnode.cli.main",
            "controlplane",
            "run",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data / "data"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(data / "cp.log", "wb"),  # noqa: SIM115
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                pytest.fail(f"control plane exited: {(data / 'cp.log').read_text()}")
            time.sleep(0.1)
        yield url, data / "data"
    finally:
        proc.terminate()
        proc.wait(10)


def _meshnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshnode.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MESHNODE_ADMIN_TOKEN": ""},
    )


def _token(cp: tuple[str, Path], node: str) -> str:
    url, data = cp
    proc = _meshnode("token", "create", "--node", node, "--cp", url, "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    return next(w for w in proc.stdout.split() if w.startswith("mn1."))


def test_enroll_command(control_plane: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = control_plane
    dirs = [
        "--config-dir",
        str(tmp_path / "etc"),
        "--state-dir",
        str(tmp_path / "state"),
        "--cgroup-parent",
        "/sys/fs/cgroup/test",
    ]
    token = _token(control_plane, "node7")
    proc = _meshnode(
        "enroll", "--cp", url, "--token", token, "--name", "node7", "--no-start", *dirs
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "etc" / "node.json").read_text())
    assert doc["name"] == "node7" and doc["control_planes"] == [url]
    assert doc["cgroup_parent"] == "/sys/fs/cgroup/test" and doc["ip"] == "127.0.0.1"
    cert = x509.load_pem_x509_certificates((tmp_path / "etc" / "node.pem").read_bytes())[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{doc['trust_domain']}/node/node7"
    ]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "etc").iterdir()}

    again = _meshnode("enroll", "--cp", url, "--token", token, "--name", "node7", *dirs)
    assert again.returncode == 0 and again.stdout.startswith("already enrolled as node7")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "etc").iterdir()} == before

    used = _meshnode(
        "enroll", "--cp", url, "--token", token, "--name", "node7", "--force", "--no-start", *dirs
    )
    assert used.returncode == 1 and "already used" in used.stderr, used.stderr
    assert "Traceback" not in used.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "etc").iterdir()} == before


def test_enroll_refusals(control_plane: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = control_plane
    dirs = [
        "--config-dir",
        str(tmp_path / "etc"),
        "--state-dir",
        str(tmp_path / "state"),
        "--no-start",
    ]
    token = _token(control_plane, "node8")
    wrong_pin = token.rsplit(".", 1)[0] + "." + PIN_A
    cases = [
        (["--token", wrong_pin, "--name", "node8"], "is not the one this token was made for"),
        (["--token", token, "--name", "node9"], "is for node 'node8'"),
        (["--token", "mn1.nope", "--name", "node8"], "malformed join token"),
    ]
    for args, says in cases:
        proc = _meshnode("enroll", "--cp", url, *args, *dirs)
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "etc" / "node.json").exists()
    port = _free_port()
    proc = _meshnode("enroll", "--cp", f"https://127.0.0.1:{port}", "--token", token, *dirs)
    assert proc.returncode == 1 and "connection refused" in proc.stderr


def test_units_for_an_installation_under_tmp_keep_tmp_visible() -> None:
    rendered = units.render_units(
        units.UnitPaths(
            Path("/opt/mn/.venv/bin/meshnode"),
            Path("/etc/meshnode"),
            Path("/var/lib/meshnode"),
            source=Path("/tmp/checkout"),
        )
    )
    assert "\nPrivateTmp=no\n" in rendered[units.AGENT_UNIT]
    assert "\nPrivateTmp=no\n" in rendered[units.ZTUNNEL_UNIT]
    assert "\nProtectHome=yes\n" in rendered[units.AGENT_UNIT]


def test_a_start_that_outlasts_systemctl_is_an_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess

    def slow(cmd: list[str], **kw: object) -> None:
        raise subprocess.TimeoutExpired(cmd, float(kw["timeout"]))  # type: ignore[arg-type]

    monkeypatch.setattr(units.subprocess, "run", slow)
    with pytest.raises(units.UnitError, match="did not finish within 660s.*systemctl status"):
        units.start_units()
    rendered = units.render_units(
        units.UnitPaths(Path("/usr/bin/meshnode"), Path("/etc/meshnode"), Path("/var/lib/mn"))
    )
    starts = [
        int(line.split("=", 1)[1])
        for text in rendered.values()
        for line in text.splitlines()
        if line.startswith("TimeoutStartSec=")
    ]
    assert starts and max(starts) < units.SYSTEMCTL_TIMEOUT  # systemd reports first
