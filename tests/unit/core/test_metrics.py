"""core/metrics.py: the exposition format both ztunnel and the control plane render,
its strict reader, and the process's own memory and CPU from /proc."""

from __future__ import annotations

import os

import pytest

from meshnode.core.metrics import (
    Counter,
    Gauge,
    Histogram,
    ProcessMetrics,
    Registry,
    parse_exposition,
    parse_proc_stat,
)


def test_what_is_rendered_reads_back_with_escaped_labels() -> None:
    r = Registry()
    c = r.add(Counter("x_total", "help", ("a",)))
    g = r.add(Gauge("y", "help"))
    h = r.add(Histogram("z_seconds", "help", (0.1, 1), ("k",)))
    c.inc(('say "hi"\\\n',), 2)
    g.set((), 5)
    g.dec()
    h.observe(0.5, ("q",))
    h.observe(5, ("q",))
    text = r.render()
    assert "# TYPE z_seconds histogram" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in parse_exposition(text)}
    assert samples[("x_total", (("a", 'say "hi"\\\n'),))] == 2
    assert samples[("y", ())] == 4
    assert samples[("z_seconds_bucket", (("k", "q"), ("le", "0.1")))] == 0
    assert samples[("z_seconds_bucket", (("k", "q"), ("le", "1")))] == 1
    assert samples[("z_seconds_bucket", (("k", "q"), ("le", "+Inf")))] == 2
    assert samples[("z_seconds_count", (("k", "q"),))] == 2
    assert samples[("z_seconds_sum", (("k", "q"),))] == 5.5
    assert r.names() == {"x_total", "y", "z_seconds"}


def test_the_reader_refuses_what_is_not_the_format() -> None:
    with pytest.raises(ValueError):
        parse_exposition("name{a=unquoted} 1\n")
    with pytest.raises(ValueError):
        parse_exposition("name_without_value\n")


def test_proc_stat_gives_cpu_seconds_and_resident_bytes() -> None:
    # pid (comm) state ppid ... utime=14 stime=15 ... rss=24 (proc(5)); a comm with
    # a space and a parenthesis, as a process may name itself.
    fields = ["S"] + ["0"] * 40
    fields[11], fields[12], fields[21] = "150", "50", "1000"
    line = "42 (we ird) name) " + " ".join(fields)
    assert parse_proc_stat(line, 4096, 100) == (2.0, 4096000.0)
    with pytest.raises(ValueError):
        parse_proc_stat("not a stat line", 4096, 100)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="no /proc on this system")
def test_process_metrics_are_read_at_each_render() -> None:
    r = Registry()
    ProcessMetrics(r)
    values = {s.name: s.value for s in parse_exposition(r.render())}
    assert values["process_resident_memory_bytes"] > 1 << 20  # a Python process: MBs
    assert values["process_cpu_seconds_total"] > 0


def test_process_metrics_stay_absent_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ProcessMetrics, "STAT", "/nonexistent/stat")
    r = Registry()
    ProcessMetrics(r)
    assert parse_exposition(r.render()) == []
