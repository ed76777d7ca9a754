"""The agent's reporter (nodeagent/report.py): the interval knob, and a failure
logged once per change of state, never raised into the agent."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from meshnode.core.contracts import NodeReport
from meshnode.nodeagent.enrolled import ControlPlaneError
from meshnode.nodeagent.report import (
    DEFAULT_REPORT_INTERVAL,
    REPORT_INTERVAL_ENV,
    Reporter,
    build_report,
    report_interval,
)


def test_interval_from_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "meshnode.nodeagent.report")
    assert report_interval({}) == DEFAULT_REPORT_INTERVAL
    assert report_interval({REPORT_INTERVAL_ENV: "5"}) == 5.0
    assert report_interval({REPORT_INTERVAL_ENV: "0.1"}) == 2.0  # the floor
    assert report_interval({REPORT_INTERVAL_ENV: "0"}) == 0.0  # off
    assert report_interval({REPORT_INTERVAL_ENV: "soon"}) == DEFAULT_REPORT_INTERVAL
    assert "'soon' is not a number of seconds" in caplog.text


class FlakyCp:
    def __init__(self) -> None:
        self.answers: list[Exception | None] = []
        self.posted: list[dict[str, Any]] = []

    def request(self, method: str, path: str, body: Any = None) -> Any:
        self.posted.append(body)
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer
        return {}


def _report() -> NodeReport:
    return build_report(
        node="node1",
        agent_ready=True,
        ztunnel_ready=False,
        config_revision=3,
        cert_not_after=2e9,
        bpf_programs=["mn_sockops", "mn_connect4", "mn_sockops"],
        endpoints=[],
        edges=[],
    )


def test_failures_are_logged_once_per_state(caplog: pytest.LogCaptureFixture) -> None:
    cp = FlakyCp()
    away = ControlPlaneError("no control plane reachable: connection refused")
    cp.answers = [None, away, away, away, None, None, ValueError("bad"), RuntimeError("bug")]
    reporter = Reporter(cp, _report, 30.0)
    caplog.set_level(logging.INFO, "meshnode.nodeagent.report")
    results = [reporter.report_once() for _ in range(8)]
    assert results == [True, False, False, False, True, True, False, False]
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("node reports reach the control plane") == 2
    assert sum("connection refused" in m for m in messages) == 1
    assert sum("failed unexpectedly: RuntimeError: bug" in m for m in messages) == 1
    assert cp.posted[0]["bpf_programs"] == ["mn_connect4", "mn_sockops"]
    assert reporter.sent == 3 and reporter.last_error == "bug"
