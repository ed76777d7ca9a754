"""`meshnode bench --quick` end to end in its own lab (`mnbench`): proves the
bench runs and reports every metric for every path, with its plots. It does
NOT assert any performance target (the machine is shared and small)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.bench.report import METRIC_KEYS, PATHS
from tests.support.skips import lab_missing

pytestmark = pytest.mark.root

TOOLS = ("wrk", "iperf3", "nginx", "haproxy", "stunnel4")


def _why_skip() -> str | None:
    why = lab_missing()
    if why:
        return why
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (
            f"missing {', '.join(missing)} (scripts/setup.sh --test installs "
            "haproxy stunnel4 nginx iperf3 wrk)"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[dev]')"
    return None


def test_bench_quick_reports_every_metric_for_every_path(tmp_path: Path) -> None:
    why = _why_skip()
    if why:
        print(f"skipping the bench smoke test: {why}")
        pytest.skip(why)
    out = tmp_path / "results"
    # All six paths, no memory sub-benchmark: about a minute here.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshnode.cli.main",
            "bench",
            "--quick",
            "--paths",
            ",".join(PATHS),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["summary"]) == set(PATHS)
    for path in PATHS:
        row = doc["summary"][path]
        for key in METRIC_KEYS:
            assert isinstance(row.get(key), (int, float)), f"{path}: no {key} in results.json"
        assert row["iperf3_gbps"] > 0 and row["ka_rps"] > 0 and row["close_rps"] > 0
        assert row["lat_p50_us"] > 0
        if path != "direct":
            assert row["proxy_cpu_s"] > 0, f"{path}: proxy CPU not measured"
            assert row["proxy_rss_mb"] > 0, f"{path}: proxy RSS not measured"
        assert "ratio_vs_direct" in doc["paths"][path]
        assert "ratio_vs_haproxy_mtls" in doc["paths"][path]
    assert len(doc["targets"]) == 7
    assert all(t["verdict"] in ("PASS", "FALL SHORT", "NOT MEASURED") for t in doc["targets"])
    for key in METRIC_KEYS:
        png = out / f"{key}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "Targets:" in proc.stdout and "| meshnode " in proc.stdout
    # The lab is gone afterwards.
    assert not Path("/run/netns/mnbench-node1").exists()
    assert not Path("/run/netns/mnbench-fabric").exists()
