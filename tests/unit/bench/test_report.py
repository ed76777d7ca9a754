"""The benchmark's pure logic (bench/report.py, bench/configs.py), driven by
captured outputs of wrk 4.1 and iperf3 3.12 and by tables of numbers. No
processes are started."""

from __future__ import annotations

import json

import pytest

from meshnode.bench import configs, report

# wrk -t1 -c2 -d1s --latency (captured on loopback)
WRK_KEEPALIVE = """\
Running 1s test @ http://127.0.0.1:18999/1k.bin
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.45ms    1.74ms  10.61ms   84.32%
    Req/Sec     1.94k   389.58     2.48k    80.00%
  Latency Distribution
     50%  546.00us
     75%    2.04ms
     90%    4.11ms
     99%    7.73ms
  1939 requests in 1.00s, 2.27MB read
Requests/sec:   1929.51
Transfer/sec:      2.26MB
"""

# wrk -t2 -c16 -d10s --latency -H "Connection: close", with errors (wrk's format)
WRK_CLOSE_ERRORS = """\
Running 10s test @ http://240.0.0.1:8080/1k.bin
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    14.91ms    6.02ms  63.11ms   71.20%
    Req/Sec   541.07     60.36   680.00     70.50%
  Latency Distribution
     50%   14.02ms
     75%   17.60ms
     90%   22.37ms
     99%    1.02s
  10787 requests in 10.02s, 12.62MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:   1076.56
Transfer/sec:      1.26MB
"""

# wrk without --latency
WRK_NO_LATENCY = """\
Running 1s test @ http://127.0.0.1:18999/1k.bin
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.45ms    1.74ms  10.61ms   84.32%
    Req/Sec     1.94k   389.58     2.48k    80.00%
  1939 requests in 1.00s, 2.27MB read
Requests/sec:   1929.51
Transfer/sec:      2.26MB
"""

# iperf3 -c 127.0.0.1 -t 1 -J (captured; intervals and per-stream data trimmed)
IPERF_OK = """\
{
 "start": {"version": "iperf 3.12",
           "system_info": "Linux vm 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0 x86_64"},
 "intervals": [],
 "end": {
  "sum_sent": {"start": 0, "end": 1.003077, "seconds": 1.003077, "bytes": 2364407808,
               "bits_per_second": 18857238740.3958, "retransmits": 2, "sender": true},
  "sum_received": {"start": 0, "end": 1.003576, "seconds": 1.003576, "bytes": 2364407808,
                   "bits_per_second": 18847862507.67256, "sender": true},
  "cpu_utilization_percent": {"host_total": 32.07, "host_user": 0, "host_system": 32.07,
                              "remote_total": 45.44, "remote_user": 1.0,
                              "remote_system": 44.43},
  "sender_tcp_congestion": "bbr", "receiver_tcp_congestion": "bbr"
 }
}
"""

# iperf3 -J against a closed port (captured)
IPERF_ERROR = """\
{
\t"start":\t{
\t\t"connected":\t[],
\t\t"version":\t"iperf 3.12",
\t\t"system_info":\t"Linux vm 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0 x86_64"
\t},
\t"intervals":\t[],
\t"end":\t{
\t},
\t"error":\t"unable to connect to server: Connection refused"
}
"""

PROC_STAT = (
    "1234 (python3 -m x) S 1 1234 1234 0 -1 4194560 1000 0 0 0 "
    "250 75 3 1 20 0 3 0 100 300000000 12000 18446744073709551615 1 1 0 0 0 0 0 "
    "16781312 16386 0 0 0 17 1 0 0 0 0 0"
)
PROC_STATUS = """\
Name:\tztunnel
State:\tS (sleeping)
Pid:\t1234
PPid:\t1200
VmPeak:\t  300000 kB
VmHWM:\t   52960 kB
VmRSS:\t   48128 kB
Threads:\t3
"""


# -- parsing ----------------------------------------------------------------------------


def test_wrk_keepalive_sample() -> None:
    r = report.parse_wrk(WRK_KEEPALIVE)
    assert r.requests == 1939
    assert r.seconds == pytest.approx(1.0)
    assert r.rps == pytest.approx(1929.51)
    assert r.p50_us == pytest.approx(546.0)
    assert r.p75_us == pytest.approx(2040.0)
    assert r.p90_us == pytest.approx(4110.0)
    assert r.p99_us == pytest.approx(7730.0)
    assert r.errors == 0


def test_wrk_errors_and_seconds_unit() -> None:
    r = report.parse_wrk(WRK_CLOSE_ERRORS)
    assert r.requests == 10787
    assert r.rps == pytest.approx(1076.56)
    assert r.p50_us == pytest.approx(14020.0)
    assert r.p99_us == pytest.approx(1.02e6)
    assert r.socket_errors == 15
    assert r.non_2xx == 5
    assert r.errors == 20


def test_wrk_without_latency_distribution_is_an_error() -> None:
    with pytest.raises(report.ParseError, match="--latency"):
        report.parse_wrk(WRK_NO_LATENCY)


def test_wrk_garbage_is_an_error() -> None:
    with pytest.raises(report.ParseError, match="Requests/sec"):
        report.parse_wrk("unable to connect to 198.18.0.12:8080 Connection refused\n")


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("812.00us", 812.0),
        ("1.23ms", 1230.0),
        ("2.01s", 2.01e6),
        ("1.5m", 90e6),
    ],
)
def test_duration_units(text: str, us: float) -> None:
    assert report.duration_us(text) == pytest.approx(us)


def test_duration_rejects_unknown_unit() -> None:
    with pytest.raises(report.ParseError):
        report.duration_us("3ns")


def test_iperf3_sample() -> None:
    r = report.parse_iperf3(IPERF_OK)
    assert r.gbps == pytest.approx(18.8479, rel=1e-4)  # as received
    assert r.sender_gbps == pytest.approx(18.8572, rel=1e-4)
    assert r.retransmits == 2


def test_iperf3_error_is_reported() -> None:
    with pytest.raises(report.ParseError, match="Connection refused"):
        report.parse_iperf3(IPERF_ERROR)


def test_iperf3_non_json() -> None:
    with pytest.raises(report.ParseError, match="not JSON"):
        report.parse_iperf3("iperf3: error - unable to connect\n")


def test_proc_stat_and_status() -> None:
    assert report.proc_stat_cpu_ticks(PROC_STAT) == 325  # utime 250 + stime 75
    assert report.proc_stat_ppid(PROC_STAT) == 1
    assert report.proc_status_kb(PROC_STATUS, "VmHWM") == 52960
    assert report.proc_status_kb(PROC_STATUS, "VmRSS") == 48128
    assert report.proc_status_kb(PROC_STATUS, "VmSwap") is None


def test_proc_stat_command_with_parenthesis() -> None:
    text = PROC_STAT.replace("(python3 -m x)", "(a) b (c)")
    assert report.proc_stat_cpu_ticks(text) == 325


def test_descendants() -> None:
    ppids = {10: 1, 11: 10, 12: 11, 13: 1, 14: 13, 15: 10}
    assert report.descendants(ppids, [10]) == [10, 11, 12, 15]
    assert report.descendants(ppids, [10, 13]) == [10, 11, 12, 13, 14, 15]
    assert report.descendants(ppids, []) == []


# -- aggregation, ratios, targets -------------------------------------------------------------


def _samples() -> dict[str, dict[str, list[float | None]]]:
    base = {
        "direct": dict(
            iperf3_gbps=[30.0, 34.5, 35.0],
            ka_rps=[95e3, 96e3, 90e3],
            close_rps=[21e3, 21.6e3, 22e3],
            lat_p50_us=[60, 62, 64],
            lat_p99_us=[100, 110, 120],
            proxy_cpu_s=[0, 0, 0],
            ka_cpu_us_per_req=[0, 0, 0],
            close_cpu_us_per_req=[0, 0, 0],
            proxy_rss_mb=[0, 0, 0],
        ),
        "meshnode": dict(
            iperf3_gbps=[5.0, 5.7, 6.0],
            ka_rps=[35e3, 36e3, 34e3],
            close_rps=[7000, 7400, 7500],
            lat_p50_us=[100, 106, 110],
            lat_p99_us=[200, 210, 260],
            proxy_cpu_s=[30, 31, 32],
            ka_cpu_us_per_req=[20, 21, 22],
            close_cpu_us_per_req=[90, 95, 99],
            proxy_rss_mb=[80, 81, 82],
        ),
        "haproxy-mtls": dict(
            iperf3_gbps=[6.3, 6.3, 6.0],
            ka_rps=[32.6e3, 32e3, 33e3],
            close_rps=[1480, 1400, 1500],
            lat_p50_us=[105, 108, 109],
            lat_p99_us=[150, 160, 170],
            proxy_cpu_s=[25, 26, 27],
            ka_cpu_us_per_req=[18, 19, 20],
            close_cpu_us_per_req=[400, 410, 420],
            proxy_rss_mb=[30, 30, 31],
        ),
        "meshnode-same-node": dict(
            iperf3_gbps=[8.0],
            ka_rps=[40e3],
            close_rps=[9000],
            lat_p50_us=[90],
            lat_p99_us=[180],
            proxy_cpu_s=[20],
            ka_cpu_us_per_req=[15],
            close_cpu_us_per_req=[60],
            proxy_rss_mb=[60],
        ),
    }
    return {p: {k: [float(x) for x in v] for k, v in m.items()} for p, m in base.items()}


def test_summarize_takes_medians_and_adds_latency() -> None:
    s = report.summarize(_samples())
    assert set(s) == {"direct", "meshnode", "haproxy-mtls", "meshnode-same-node"}
    for row in s.values():
        assert set(row) == set(report.METRIC_KEYS)
    assert s["direct"]["iperf3_gbps"] == 34.5
    assert s["meshnode"]["ka_rps"] == 35e3
    assert s["meshnode"]["added_p50_us"] == pytest.approx(106 - 62)
    assert s["haproxy-mtls"]["added_p99_us"] == pytest.approx(160 - 110)
    assert s["direct"]["added_p50_us"] == 0


def test_summarize_without_baseline_leaves_added_latency_undefined() -> None:
    samples = _samples()
    del samples["direct"]
    s = report.summarize(samples)
    assert s["meshnode"]["added_p50_us"] is None


def test_median_ignores_none() -> None:
    assert report.median([None, 3.0, 1.0]) == 2.0
    assert report.median([None]) is None
    assert report.median([]) is None


def test_ratios() -> None:
    s = report.summarize(_samples())
    vs_direct = report.ratios(s, "direct")
    vs_hap = report.ratios(s, "haproxy-mtls")
    assert vs_direct["meshnode"]["ka_rps"] == pytest.approx(35e3 / 95e3)
    assert vs_hap["meshnode"]["close_rps"] == pytest.approx(7400 / 1480)
    assert vs_direct["meshnode"]["proxy_cpu_s"] is None  # direct has no proxy: no ratio
    assert report.ratios(s, "central-lb")["meshnode"]["ka_rps"] is None


def test_per_request_and_slope_and_estimate() -> None:
    assert report.per_request_us(2.0, 100_000) == pytest.approx(20.0)
    assert report.per_request_us(1.0, 0) == 0.0
    assert report.slope([(1, 40.0), (10, 41.0), (100, 50.0)]) == pytest.approx(0.1008, abs=1e-3)
    assert report.slope([(1, 40.0), (100, 40.0 + 99 * 0.05)]) == pytest.approx(0.05)
    assert report.slope([(5, 1.0)]) is None
    assert report.sidecar_estimate_mb(12.5) == 1250.0


def test_targets_verdicts() -> None:
    s = report.summarize(_samples())
    mem = {"slope_mb_per_workload": 0.05, "peak_rss_mb": 70.0}
    by_name = {t.name: t for t in report.targets(s, mem, ztunnel_peak_rss_mb=55.0)}
    assert len(by_name) == 7
    ka = by_name["keep-alive req/s: meshnode >= 1.1x haproxy-mtls"]
    assert ka.verdict == report.FALL_SHORT  # 35k / 32.6k = 1.07
    assert ka.measured.startswith("1.07x")
    assert by_name["iperf3: meshnode >= 1.0x haproxy-mtls"].verdict == report.FALL_SHORT
    close = by_name["Connection: close req/s: meshnode >= 5x haproxy-mtls"]
    assert close.verdict == report.PASS and close.measured.startswith("5.00x")
    lat = by_name["added p50 latency (1 connection): meshnode <= haproxy-mtls"]
    assert lat.verdict == report.PASS  # added 106-62 = 44 us vs 108-62 = 46 us
    assert lat.measured == "44 us vs 46 us"
    same = by_name["same-node keep-alive req/s >= 0.8x direct"]
    assert same.verdict == report.FALL_SHORT  # 40k / 95k
    rss = by_name["ztunnel RSS <= 64 MB under connection churn"]
    assert rss.verdict == report.FALL_SHORT and rss.measured.startswith("70.0 MB")
    assert by_name["ztunnel RSS grows <= 0.1 MB per added workload"].verdict == report.PASS


def test_targets_not_measured() -> None:
    s = report.summarize({"direct": _samples()["direct"]})
    tgts = report.targets(s)
    assert [t.verdict for t in tgts] == [report.NOT_MEASURED] * 7


# -- rendering ------------------------------------------------------------------------------


def test_tables_render_every_path_and_ratio() -> None:
    s = report.summarize(_samples())
    table = report.render_table(s)
    lines = table.splitlines()
    assert lines[0].startswith("| path ")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == [
        "direct",
        "meshnode",
        "haproxy-mtls",
        "meshnode-same-node",
    ]
    assert "35.0k" in table and "34.50" in table
    assert len({len(ln) for ln in lines}) == 1  # aligned
    ratios = report.render_ratio_table(s)
    assert "keep-alive / haproxy" in ratios and "5.00x" in ratios
    text = report.render_report(
        s,
        report.targets(s),
        {
            "points": [
                {"workloads": 1, "rss_mb": 40.0, "hwm_mb": 45.0},
                {"workloads": 100, "rss_mb": 50.0, "hwm_mb": 55.0},
            ],
            "slope_mb_per_workload": 0.101,
            "haproxy_sidecar_rss_mb": 12.0,
            "sidecars_100_estimate_mb": 1200.0,
        },
    )
    assert "ESTIMATE" in text and "1200 MB" in text and "FALL SHORT" in text
    assert "0.101 MB" in text


def test_report_with_memory_only() -> None:
    text = report.render_report(
        {},
        report.targets({}),
        {
            "points": [{"workloads": 1, "rss_mb": 40.0, "hwm_mb": 45.0}],
            "slope_mb_per_workload": None,
        },
    )
    assert "Medians" not in text and "Memory" in text and "NOT MEASURED" in text


def test_fmt_value() -> None:
    assert report.fmt_value("ka_rps", 35123.0) == "35.1k"
    assert report.fmt_value("close_rps", 1480.4) == "1480"
    assert report.fmt_value("iperf3_gbps", 5.678) == "5.68"
    assert report.fmt_value("lat_p50_us", None) == "-"


def test_results_json_round_trip() -> None:
    s = report.summarize(_samples())
    doc = json.loads(json.dumps({"summary": s}))
    assert doc["summary"]["meshnode"]["ka_rps"] == 35e3


# -- configs (pure text) ----------------------------------------------------------------------


def test_haproxy_pair_configs() -> None:
    tunnels = [configs.Tunnel("http", 20080, 20443, "127.0.0.1:8080")]
    cli = configs.haproxy_client_conf(tunnels, "198.18.0.12", "/p/c.pem", "/p/ca.pem", 2)
    srv = configs.haproxy_server_conf(tunnels, "198.18.0.12", "/p/s.pem", "/p/ca.pem", 2)
    assert "nbthread 2" in cli and "mode tcp" in cli
    assert "bind 127.0.0.1:20080" in cli
    assert "server peer 198.18.0.12:20443 ssl crt /p/c.pem ca-file /p/ca.pem verify required" in cli
    assert "bind 198.18.0.12:20443 ssl crt /p/s.pem ca-file /p/ca.pem verify required" in srv
    assert "server app 127.0.0.1:8080" in srv
    for text in (cli, srv):
        assert "ssl-min-ver TLSv1.3" in text
        assert "no-tls-tickets" not in text  # session reuse stays on


def test_stunnel_and_lb_and_nginx_configs() -> None:
    tunnels = [configs.Tunnel("http", 21080, 21443, "127.0.0.1:8080")]
    cli = configs.stunnel_client_conf(tunnels, "198.18.0.12", "/c.pem", "/c.key", "/ca", "/l")
    srv = configs.stunnel_server_conf(tunnels, "198.18.0.12", "/s.pem", "/s.key", "/ca", "/l")
    assert "client = yes" in cli and "accept = 127.0.0.1:21080" in cli
    assert "requireCert = yes" in srv and "verifyChain = yes" in srv
    lb = configs.haproxy_lb_conf("198.18.0.13", {22080: ["a:1", "b:2"]}, 2)
    assert "balance roundrobin" in lb and "server b1 a:1" in lb and "server b2 b:2" in lb
    ng = configs.nginx_conf("/w", "web", 8080, "/w/www")
    assert "worker_processes 1;" in ng and "listen 8080" in ng and "root /w/www;" in ng
