"""Reading CPU time and memory of running processes from /proc (thin shell
around the pure parsers in report.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from meshnode.bench import report

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def ppid_table() -> dict[int, int]:
    table: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        text = _read(f"/proc/{entry.name}/stat")
        if text:
            with contextlib.suppress(ValueError, IndexError):
                table[int(entry.name)] = report.proc_stat_ppid(text)
    return table


def with_children(roots: Iterable[int]) -> list[int]:
    """The given processes and all their descendants that are alive now."""
    roots = [p for p in roots if p]
    if not roots:
        return []
    return [p for p in report.descendants(ppid_table(), roots) if os.path.exists(f"/proc/{p}")]


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        text = _read(f"/proc/{pid}/stat")
        if text:
            ticks += report.proc_stat_cpu_ticks(text)
    return ticks / CLK_TCK


def status_mb(pid: int, field: str) -> float | None:
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    kb = report.proc_status_kb(text, field)
    return None if kb is None else kb / 1024.0


def comm(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or "?").strip()
