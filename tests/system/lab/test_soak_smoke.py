"""`meshnode bench --soak 20s` end to end in the bench's own lab (`mnbench`):
proves the soak runs both clients through the mesh, samples the ztunnels and
reports slopes, failures and the slowest request. It asserts completeness
only, no figure (20 s on a shared machine says nothing about leaks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.skips import lab_missing

pytestmark = pytest.mark.root

TOOLS = ("wrk", "nginx", "iperf3")


def _why_skip() -> str | None:
    why = lab_missing()
    if why:
        return why
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (scripts/setup.sh --test installs them)"
    return None


def test_soak_smoke_reports_samples_slopes_and_requests(tmp_path: Path) -> None:
    why = _why_skip()
    if why:
        print(f"skipping the soak smoke test: {why}")
        pytest.skip(why)
    out = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode.cli.main", "bench", "--soak", "20s", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"soak failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads((out / "soak.json").read_text())
    assert doc["duration_s"] == 20
    assert len(doc["samples"]) >= 5, doc["samples"]
    assert all(s["rss_mb"] > 0 and s["fds"] > 0 for s in doc["samples"])
    assert set(doc["clients"]) == {"close", "keepalive"}
    for name, client in doc["clients"].items():
        assert client["requests"] > 0, f"{name}: no requests"
        assert client["max_us"] is not None and client["max_us"] > 0
    assert doc["requests"] == sum(c["requests"] for c in doc["clients"].values())
    assert isinstance(doc["failed"], int)
    assert doc["rss_slope_mb_per_min"] is not None and doc["fd_slope_per_min"] is not None
    assert "MB/min" in proc.stdout and "slowest" in proc.stdout
