"""docs/cli.md documents each JSON kind's fields: the tables there must name
exactly what the commands print (a field added or renamed without the docs fails
here), and every kind printed must be documented."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.unit.cli.conftest import ControlPlane, Node, invoke

DOC = Path(__file__).resolve().parents[3] / "docs" / "cli.md"
POLICY_LISTS = (
    "AuthorizationPolicyList",
    "PeerAuthenticationList",
    "TrafficSplitList",
    "MeshConfigList",
    "IdentityGrantList",
)


@dataclass(frozen=True)
class Field:
    name: str
    type: str

    @property
    def optional(self) -> bool:
        return "optional" in self.type

    @property
    def free_form(self) -> bool:
        return "free-form" in self.type

    @property
    def element_kind(self) -> str | None:
        m = re.search(r"list of `(\w+)`", self.type)
        return m.group(1) if m else None


def documented_kinds(text: str) -> dict[str, list[Field]]:
    """`### Kind[, Kind...]` headings, each followed by a `| field | type | meaning |` table."""
    kinds: dict[str, list[Field]] = {}
    names: list[str] = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("### "):
            names = [n.strip().strip("`") for n in line[4:].split(",")]
            in_table = False
            continue
        cells = (
            [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        )
        if cells[:2] == ["field", "type"] and names:
            in_table = True
            for n in names:
                kinds[n] = []
            continue
        if not in_table:
            continue
        if not cells:
            in_table, names = False, []
            continue
        if set(cells[0]) <= set("-"):
            continue
        for n in names:
            kinds[n].append(Field(cells[0].strip("`"), cells[1]))
    return kinds


KINDS = documented_kinds(DOC.read_text())


def expected(kind: str, prefix: str = "") -> tuple[set[str], set[str], set[str]]:
    """(all documented paths, the ones always present, the free-form ones) of `kind`."""
    every, required, free = set(), set(), set()
    for f in KINDS[kind]:
        if prefix and f.name in ("apiVersion", "kind"):
            continue  # list entries are documents without them
        path = prefix + f.name
        every.add(path)
        if not f.optional:
            required.add(path)
        if f.free_form:
            free.add(path)
        if f.element_kind is not None:
            e, r, fr = expected(f.element_kind, f"{path}[].")
            every |= e
            free |= fr
            required |= r if not f.optional else set()
    return every, required, free


def emitted(doc: Any, prefix: str = "") -> set[str]:
    """Every field path of `doc`: `a.b` for nested objects, `a[].b` in lists of objects."""
    out: set[str] = set()
    for key, value in doc.items():
        path = prefix + key
        out.add(path)
        if isinstance(value, dict):
            out |= emitted(value, path + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                out |= emitted(v, path + "[].")
    return out


def check(kind: str, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "meshnode/v1" and doc["kind"] == kind
    every, required, free = expected(kind)
    got = {
        p
        for p in emitted(doc)
        if not any(p.startswith(f + ".") or p.startswith(f + "[].") for f in free)
    }
    assert not got - every, f"{kind}: printed but not in docs/cli.md: {sorted(got - every)}"
    assert not required - got, (
        f"{kind}: in docs/cli.md (not optional) but not printed: {sorted(required - got)}"
    )


def _json(args: list[str]) -> dict[str, Any]:
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_the_docs_have_tables_for_every_kind() -> None:
    want = {
        "NodeStatus",
        "LocalWorkloadList",
        "ConfigDump",
        "Node",
        "NodeList",
        "Workload",
        "WorkloadList",
        "Service",
        "ServiceList",
        "ZoneList",
        "Zone",
        *POLICY_LISTS,
    }
    assert set(KINDS) == want
    for kind, fields in KINDS.items():
        names = [f.name for f in fields]
        assert names[:2] == ["apiVersion", "kind"], kind
        assert len(names) == len(set(names)), f"{kind}: a field twice"


def test_node_status_matches_the_docs(node: Node) -> None:
    check("NodeStatus", _json(["status", *node.args(), "-o", "json"]))


def test_local_workload_list_matches_the_docs(node: Node) -> None:
    check("LocalWorkloadList", _json(["workload", "ls", *node.args(), "-o", "json"]))


def test_config_dump_matches_the_docs(ztunnel_admin: str) -> None:
    check("ConfigDump", _json(["config", "dump", "--admin", ztunnel_admin]))
    policies = _json(["config", "dump", "--admin", ztunnel_admin, "--section", "policies"])
    assert set(policies) == {"apiVersion", "kind", "policies"}
    assert {f.name for f in KINDS["ConfigDump"]} >= set(policies)


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["nodes"], "NodeList"),
        (["node", "node1"], "Node"),
        (["workloads"], "WorkloadList"),
        (["workload", "web"], "Workload"),
        (["services"], "ServiceList"),
        (["svc", "web"], "Service"),
        (["trafficsplits"], "TrafficSplitList"),
        (["authorizationpolicies"], "AuthorizationPolicyList"),
        (["peerauthentications"], "PeerAuthenticationList"),
        (["meshconfigs"], "MeshConfigList"),
        (["identitygrants"], "IdentityGrantList"),
    ],
)
def test_get_matches_the_docs(controlplane: ControlPlane, args: list[str], kind: str) -> None:
    result = controlplane.get(*args, "-o", "json")
    assert result.exit_code == 0, result.stderr
    check(kind, json.loads(result.stdout))


def test_the_checker_notices_a_renamed_or_new_field(node: Node) -> None:
    doc = _json(["status", *node.args(), "-o", "json"])
    doc["agent"]["pid_renamed"] = doc["agent"].pop("pid")
    with pytest.raises(AssertionError, match="pid_renamed"):
        check("NodeStatus", doc)
    doc = _json(["status", *node.args(), "-o", "json"])
    doc["new_field"] = 1
    with pytest.raises(AssertionError, match="new_field"):
        check("NodeStatus", doc)
