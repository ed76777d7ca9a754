"""The wheel (issue 15): built from the checkout with pip, it holds the BPF
sources the loader compiles at run time, the CLI entry point and the runtime
dependencies; installed into a directory of its own, it runs from there, not
from the checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("meshnode-*-py3-none-any.whl")
    return built


def test_the_wheel_holds_the_bpf_sources_the_entry_point_and_its_dependencies(
    wheel: Path,
) -> None:
    from meshnode.bpf import loader

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
        entry = z.read(meta.replace("METADATA", "entry_points.txt")).decode()
    for src in (*loader._SOURCES, "meshnode.h"):
        assert f"meshnode/bpf/{src}" in names, f"{src} is not in the wheel"
    assert "meshnode = meshnode.cli.main:main" in entry
    for dep in ("aiohttp", "cryptography", "dnspython", "h2", "click"):
        assert f"Requires-Dist: {dep}" in metadata, dep
    assert not any(n.startswith(("tests/", "fuzz/", "lab/", "bench/")) for n in names)


def test_the_installed_wheel_runs_from_its_own_directory(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The wheel's package first, the dependencies from this environment after it.
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    probe = (
        "import json, meshnode, meshnode.bpf.loader as l; "
        "print(json.dumps({'pkg': meshnode.__file__, 'bpf': str(l._BPF_DIR), "
        "'sources': [(l._BPF_DIR / s).is_file() for s in l._SOURCES]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["pkg"].startswith(str(target)) and got["bpf"].startswith(str(target))
    assert all(got["sources"])
    cli = subprocess.run(
        [sys.executable, "-m", "meshnode.cli.main", "--help"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "enroll" in cli.stdout and "dns" in cli.stdout
