"""The Debian package the nspawn nodes install (scripts/build-deb.sh), built once
per test session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import REPO

BUILD_DEB = REPO / "scripts" / "build-deb.sh"


def build_deb(out: Path, version: str | None = None) -> Path:
    """Build meshnode_<version>_<arch>.deb into `out`; return its path."""
    argv = ["bash", str(BUILD_DEB), "--out", str(out)]
    if version:
        argv += ["--version", version]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"scripts/build-deb.sh failed:\n{proc.stdout}{proc.stderr}"
    debs = sorted(out.glob(f"meshnode_{version or ''}*.deb"))
    assert len(debs) == 1, f"expected one package in {out}: {debs}"
    return debs[0]


@pytest.fixture(scope="session")
def meshnode_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deb(tmp_path_factory.mktemp("deb"))
