"""`-o table|yaml|json` (and `text`, the old name of table) on status, workload ls,
config dump and get; `meshnode completion`; progress lines with --progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from meshnode.cli.main import cli
from meshnode.cli.output import Progress
from tests.unit.cli.conftest import ControlPlane, Node, invoke


def _run(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def _formats(args: list[str], kind: str, headers: list[str]) -> dict[str, Any]:
    doc = json.loads(_run(*args, "-o", "json"))
    assert doc["apiVersion"] == "meshnode/v1" and doc["kind"] == kind
    assert yaml.safe_load(_run(*args, "-o", "yaml")) == doc
    table = _run(*args, "-o", "table")
    for header in headers:
        assert header in table.splitlines()[0], table
    return dict(doc)


def test_status(node: Node) -> None:
    doc = _formats(["status", *node.args()], "NodeStatus", ["node"])
    assert doc["services"][0]["vip"] == "240.0.0.1"
    table = _run("status", *node.args())  # the default: for people
    assert "240.0.0.1" in table and "mn_connect4#7" in table and "problem: a problem" in table
    assert _run("status", *node.args(), "-o", "text") == table  # the old name


def test_workload_ls(node: Node) -> None:
    doc = _formats(["workload", "ls", *node.args()], "LocalWorkloadList", ["NAME", "MESHED"])
    assert [(i["name"], i["meshed"]) for i in doc["items"]] == [("web", True), ("api", False)]
    table = _run("workload", "ls", *node.args(), "-o", "text")
    assert "unit web.service" in table and "pid 42" in table and "not yet" in table


def test_config_dump(ztunnel_admin: str) -> None:
    args = ["config", "dump", "--admin", ztunnel_admin]
    doc = _formats(args, "ConfigDump", ["node"])
    assert json.loads(_run(*args)) == doc  # JSON by default, as before
    assert doc["endpoints"][0]["state"] == "healthy"
    table = _run(*args, "-o", "table")
    assert "198.18.0.12:8080 (worker 0)  healthy" in table and "allow-web" in table
    only = json.loads(_run(*args, "--section", "endpoints"))
    assert set(only) == {"apiVersion", "kind", "endpoints"}


def test_config_dump_without_ztunnel_says_what_to_do() -> None:
    result = invoke("config", "dump", "--admin", "127.0.0.1:1")
    assert result.exit_code == 1 and "Is ztunnel running" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_get(controlplane: ControlPlane) -> None:
    for args, kind, headers in (
        (["nodes"], "NodeList", ["NAME", "LAST REPORT"]),
        (["workloads"], "WorkloadList", ["NODE", "SERVICE"]),
        (["services"], "ServiceList", ["NAMESPACE", "VIP"]),
        (["trafficsplits"], "TrafficSplitList", ["KIND", "NAME"]),
    ):
        result = controlplane.get(*args, "-o", "json")
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["kind"] == kind and isinstance(doc["revision"], int) and doc["items"]
        table = controlplane.get(*args).stdout.splitlines()[0]
        assert all(h in table for h in headers), table
    services = yaml.safe_load(controlplane.get("services", "-o", "yaml").stdout)
    assert services["kind"] == "ServiceList" and services["items"][0]["name"] == "web"
    one = json.loads(controlplane.get("svc", "web", "-o", "json").stdout)
    assert one["kind"] == "Service" and one["vip"] == services["items"][0]["vip"]
    # Policy resources: YAML that `meshnode apply -f` takes back; one resource in JSON
    # is the resource document itself.
    docs = list(yaml.safe_load_all(controlplane.get("trafficsplit", "-o", "yaml").stdout))
    assert [d["kind"] for d in docs] == ["TrafficSplit"]
    one = json.loads(controlplane.get("trafficsplit", "web-split", "-o", "json").stdout)
    assert one["kind"] == "TrafficSplit" and "apiVersion" not in one


def test_an_unknown_format_is_refused_with_the_choices(node: Node) -> None:
    result = invoke("status", *node.args(), "-o", "xml")
    assert result.exit_code == 2
    assert "'table', 'yaml', 'json'" in result.stderr or "table, yaml, json" in result.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_clicks_script(shell: str) -> None:
    out = _run("completion", shell)
    assert f"_MESHNODE_COMPLETE={shell}_complete" in out
    assert "_meshnode_completion" in out


def test_completion_refuses_other_shells() -> None:
    result = invoke("completion", "tcsh")
    assert result.exit_code == 2 and "bash" in result.stderr


def test_completion_completes_commands_and_formats() -> None:
    """What the scripts ask: `meshnode sta<TAB>`, `meshnode get nodes -o <TAB>`."""
    from click.shell_completion import ShellComplete

    comp = ShellComplete(cli, {}, "meshnode", "_MESHNODE_COMPLETE")
    assert "status" in [c.value for c in comp.get_completions([], "sta")]
    assert [c.value for c in comp.get_completions(["get", "nodes", "-o"], "")] == [
        "table",
        "yaml",
        "json",
    ]


def test_progress_counts_steps_with_their_time() -> None:
    lines: list[str] = []
    now = iter([0.0, 1.25, 1.5, 4.0])
    p = Progress(3, lines.append, clock=lambda: next(now))
    p.step("node1: enrolled")
    p.step("node2: enrolled")
    p.step("all done")
    assert lines == [
        "[1/3] node1: enrolled (1.2 s)",
        "[2/3] node2: enrolled (0.2 s)",
        "[3/3] all done (2.5 s)",
    ]
    Progress(1, None).step("nothing printed")  # quiet


class _FakeLab:
    name = "mnlab"

    def up(self, nodes: int, log: Any, progress: Any = None, **_: Any) -> None:
        log("the lab's own log")
        if progress is not None:
            progress(f"[1/{nodes}] node1: enrolled (0.1 s)")


def test_lab_up_prints_progress_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshnode.cli import lab

    monkeypatch.setattr(lab, "_lab", _FakeLab)
    quiet = CliRunner().invoke(cli, ["lab", "up", "--nodes", "8"])
    assert quiet.exit_code == 0 and quiet.stderr == ""  # stderr is no terminal here
    loud = CliRunner().invoke(cli, ["lab", "up", "--nodes", "8", "--progress"])
    assert loud.exit_code == 0
    assert loud.stderr == "[1/8] node1: enrolled (0.1 s)\n"
    assert "[1/8]" not in loud.stdout and "the lab's own log" in loud.stdout


def test_enroll_progress(controlplane: ControlPlane, tmp_path: Path) -> None:
    server = controlplane.server
    token = server.admin(server.cp.admin_token).call("POST", "/v1/admin/tokens", {"node": "node9"})[
        "token"
    ]
    args = [
        "enroll", "--cp", server.url, "--token", token, "--name", "node9", "--no-start",
        "--config-dir", str(tmp_path / "etc"), "--state-dir", str(tmp_path / "state"),
        "--cgroup-parent", "/sys/fs/cgroup/test", "--progress",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line.split("] ")[0] for line in lines] == ["[1/2", "[2/2"], lines
    assert "node9: enrolled with" in lines[0] and lines[0].endswith(" s)")
    assert "written to" in lines[1]
    assert "[1/2]" not in result.stdout and "enrolled node9" in result.stdout


def test_bench_counts_its_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison's steps, with Bench's work stubbed out (it needs root)."""
    from meshnode.bench import runner
    from meshnode.cli.bench import _progress_bench

    for name, value in (
        ("setup", None),
        ("check_paths", None),
        ("measure_path", {"ka_rps": 1.0}),
        ("memory", {}),
        ("teardown", None),
    ):
        monkeypatch.setattr(runner.Bench, name, lambda *_a, _v=value, **_k: _v)
    opts = runner.Options(paths=["direct", "meshnode"], duration=1, repeat=2, memory=True)
    lines: list[str] = []
    b = _progress_bench(opts, lines.append)
    spec = runner.PathSpec("direct", "node1", None, "http://x/", "198.18.0.12", 1, list)
    b.setup()
    b.check_paths([spec, spec])
    for _ in range(4):
        b.measure_path(spec)
    b.memory()
    b.teardown()
    assert [line.split("] ")[0] for line in lines] == [f"[{i}/8" for i in range(1, 9)]
    assert "direct: measured" in lines[2] and "down" in lines[-1]
