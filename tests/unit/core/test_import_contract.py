"""The import rule (docs/architecture.md): ztunnel, nodeagent and controlplane
depend on core (and bpf), never on each other; entry points sit on top. Checked
by import-linter with the contracts in pyproject.toml, and shown to fail on a
forbidden import planted in a copy of the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import meshnode
from tests.support import REPO

ROOT = REPO
LINT = Path(sys.executable).with_name("lint-imports")


def _installed_tree() -> Path:
    """The `meshnode` folder the linter analyses (the link tree of the editable
    install, or site-packages), not the checkout's bare meshnode/ folder."""
    for entry in meshnode.__path__:
        if (Path(entry) / "ztunnel").is_dir():
            return Path(entry)
    pytest.fail("meshnode is not installed with its subpackages (run scripts/setup.sh --test)")


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: install the dev extra (scripts/setup.sh --test)")
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contracts_hold(tmp_path: Path) -> None:
    proc = _lint(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_a_forbidden_import_breaks_them(tmp_path: Path) -> None:
    copy = tmp_path / "site" / "meshnode"
    shutil.copytree(_installed_tree(), copy, symlinks=False)
    target = copy / "ztunnel" / "routing.py"
    target.write_text(target.read_text() + "\nfrom meshnode.controlplane import registry  # noqa\n")
    proc = _lint(tmp_path, pythonpath=tmp_path / "site")
    assert proc.returncode != 0, proc.stdout
    assert "meshnode.ztunnel.routing -> meshnode.controlplane.registry" in proc.stdout
