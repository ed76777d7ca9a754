"""The control-plane simulator (bench/cpsim.py): its arithmetic exactly, and a
small real run (a real control plane on loopback, 5 nodes with real TLS)
asserting completeness only, never performance."""

from __future__ import annotations

import math

from meshnode.bench import cpsim


def test_percentile_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert cpsim.percentile(values, 50) == 3.0
    assert cpsim.percentile(values, 99) == 5.0
    assert cpsim.percentile(values, 1) == 1.0
    assert math.isnan(cpsim.percentile([], 50))


def test_rate_per_tenth_flat_and_slowing() -> None:
    flat = [float(i + 1) for i in range(100)]  # one per second
    assert cpsim.rate_per_tenth(0.0, flat) == [1.0] * 10
    assert cpsim.last_vs_first(cpsim.rate_per_tenth(0.0, flat)) == 1.0
    # Each completion takes longer than the one before: the last tenth is slower.
    slowing, t = [], 0.0
    for i in range(100):
        t += 1 + i / 10
        slowing.append(t)
    rates = cpsim.rate_per_tenth(0.0, slowing)
    assert rates[0] > rates[-1] and cpsim.last_vs_first(rates) < 0.2
    assert cpsim.rate_per_tenth(0.0, [2.0]) == [0.5]


def test_propagation_and_render() -> None:
    p = cpsim.propagation(100.0, [(100.1, 400), (100.3, 600)])
    assert p["reached"] == 2 and p["bytes_per_node"] == 500
    assert math.isclose(p["max"], 0.3) and math.isclose(p["p50"], 0.1)
    result = {
        "nodes": 2, "workloads": 1, "procs": 1, "store": "SQLite", "enroll_rate": 10.0,
        "registered": 2, "register_seconds": 1.0, "register_rate": 2.0,
        "register_rate_per_tenth": [2.0], "register_last_vs_first": math.nan,
        "sync_seconds": 0.5, "sync_bytes_per_node": 2e6, "policy": p, "endpoint": p,
        "restart": p, "cp_rss_mb": 50.0, "cp_cpu_seconds": 1.0, "loadgen_cpu_seconds": 2.0,
    }  # fmt: skip
    text = cpsim.render(result)
    assert "| 2 | 10/s | 2 in 1.0 s (2/s) | 0.5 s, 2.00 MB/node |" in text
    assert "100/300/300 ms" in text and "the load generator used more CPU" in text


def test_a_small_real_run_is_complete() -> None:
    result = cpsim.run_simulation(cpsim.SimOptions(nodes=5, workloads=3, procs=2))
    assert result["registered"] == 15
    assert result["policy"]["reached"] == 5 and result["endpoint"]["reached"] == 5
    assert result["restart"]["reached"] == 5  # every watcher back after a restart
    assert result["sync_bytes_per_node"] > 0 and result["endpoint"]["bytes_per_node"] > 0
    assert result["cp_rss_mb"] > 0 and "| 5 |" in cpsim.render(result)
