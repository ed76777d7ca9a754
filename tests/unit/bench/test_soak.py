"""The soak's pure parts (bench/soak.py): duration parsing, wrk's slowest
request, slopes and the warm-up cut."""

from __future__ import annotations

import pytest

from meshnode.bench import soak

WRK = """Running 20s test @ http://10.96.0.2:8080/1k.bin
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  730.08us  26.60ms   93.44%
    Req/Sec     1.84k   110.42     2.03k    72.00%
"""


def test_parse_duration_units_and_bounds() -> None:
    assert soak.parse_duration("20s") == 20
    assert soak.parse_duration("5m") == 300
    assert soak.parse_duration("0.5h") == 1800
    assert soak.parse_duration("45") == 45
    for bad in ("5", "5d", "-1m", "5h", "m"):
        with pytest.raises(soak.SoakError):
            soak.parse_duration(bad)


def test_wrk_max_is_the_slowest_request() -> None:
    assert soak.wrk_max_us(WRK) == pytest.approx(26600)
    assert soak.wrk_max_us("no latency here") is None


def test_slope_per_minute_and_warmup() -> None:
    assert soak.slope_per_minute([(0, 10.0), (60, 11.0), (120, 12.0)]) == pytest.approx(1.0)
    assert soak.slope_per_minute([(0, 5.0)]) is None
    result = soak.SoakResult(duration_s=100, warmup_s=soak.warmup_seconds(100))
    assert result.warmup_s == 20
    # Growth during the warm-up only: no slope after it.
    result.samples = [soak.Sample(t, 50.0 + (t if t < 20 else 20), 40) for t in range(0, 101, 5)]
    rss, fds = result.slopes()
    assert rss == pytest.approx(0.0) and fds == pytest.approx(0.0)
    assert "MB/min" in result.render()
