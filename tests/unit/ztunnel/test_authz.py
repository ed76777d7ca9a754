from __future__ import annotations

import pytest

from meshnode.core.identity import SpiffeId
from meshnode.core.resources import (
    AuthorizationPolicy,
    Destination,
    Rule,
    Selector,
    Source,
    parse_documents,
)
from meshnode.ztunnel.authz import Authorizer, AuthzDecision, AuthzRequest
from tests.support import REPO

TD = "cluster.local"


def policies(text: str) -> list[AuthorizationPolicy]:
    parsed = parse_documents(text)
    assert all(isinstance(p, AuthorizationPolicy) for p in parsed)
    return [p for p in parsed if isinstance(p, AuthorizationPolicy)]


def req(
    source: str = "default/client",
    dest: str = "default/web",
    port: int = 8080,
    services: frozenset[str] | None = None,
) -> AuthzRequest:
    """`source` and `dest` as "namespace/service"; the source's service account is its
    service name, and it backs that one service unless `services` says otherwise."""
    src_ns, src_sa = source.split("/")
    dst_ns, dst_svc = dest.split("/")
    return AuthzRequest(
        source=SpiffeId(TD, src_ns, src_sa),
        source_services=frozenset(
            f"{src_ns}/{s}" for s in ({src_sa} if services is None else services)
        ),
        dest_service=dst_svc,
        dest_namespace=dst_ns,
        dest_port=port,
    )


def decide(text: str, request: AuthzRequest, default_action: str = "ALLOW") -> AuthzDecision:
    return Authorizer(policies(text), default_action).check(request)


# --- policy library for the tables -------------------------------------------------

ALLOW_FRONTEND = """
kind: AuthorizationPolicy
metadata: {name: allow-frontend}
spec:
  action: ALLOW
  selector: {services: [web]}
  rules:
    - from: {services: [frontend]}
"""

DENY_BATCH = """
kind: AuthorizationPolicy
metadata: {name: deny-batch}
spec:
  action: DENY
  rules:
    - from: {principals: ["spiffe://cluster.local/ns/default/sa/batch"]}
"""

ALLOW_ALL_IN_NS = """
kind: AuthorizationPolicy
metadata: {name: allow-all}
spec:
  action: ALLOW
  rules: [{}]
"""

ALLOW_MONITORING = """
kind: AuthorizationPolicy
metadata: {name: allow-monitoring}
spec:
  action: ALLOW
  rules:
    - from: {namespaces: [monitoring]}
      to: {ports: [15020]}
"""

OTHER_NS_DENY_ALL = """
kind: AuthorizationPolicy
metadata: {name: deny-everything, namespace: other}
spec:
  action: DENY
  rules: [{}]
"""


def join(*docs: str) -> str:
    return "---\n".join(docs)


# (id, policies, default action, request, allowed, deciding policy, reason)
CASES = [
    (
        "no policies, default allow",
        "",
        "ALLOW",
        req(),
        True,
        None,
        "no ALLOW policy applies to service web in namespace default: default action ALLOW",
    ),
    (
        "no policies, default deny",
        "",
        "DENY",
        req(),
        False,
        None,
        "no ALLOW policy applies to service web in namespace default: default action DENY",
    ),
    (
        "allow rule matches",
        ALLOW_FRONTEND,
        "DENY",
        req("default/frontend"),
        True,
        "default/allow-frontend",
        "ALLOW policy default/allow-frontend rules[0] matched",
    ),
    (
        "allow applicable, no rule matches -> deny even with default ALLOW",
        join(ALLOW_FRONTEND, ALLOW_MONITORING),
        "ALLOW",
        req("default/client"),
        False,
        None,
        "no ALLOW rule matched (applicable: default/allow-frontend, default/allow-monitoring)",
    ),
    (
        "DENY beats ALLOW",
        join(ALLOW_ALL_IN_NS, DENY_BATCH),
        "ALLOW",
        req("default/batch"),
        False,
        "default/deny-batch",
        "DENY policy default/deny-batch rules[0] matched",
    ),
    (
        "DENY that does not match falls through to ALLOW",
        join(ALLOW_ALL_IN_NS, DENY_BATCH),
        "DENY",
        req("default/client"),
        True,
        "default/allow-all",
        "ALLOW policy default/allow-all rules[0] matched",
    ),
    (
        "DENY only, not matching -> default action",
        DENY_BATCH,
        "DENY",
        req("default/client"),
        False,
        None,
        "default action DENY",
    ),
    (
        "policy in another namespace does not apply",
        OTHER_NS_DENY_ALL,
        "ALLOW",
        req("other/client", dest="default/web"),
        True,
        None,
        "default action ALLOW",
    ),
    (
        "policy in the destination namespace applies",
        OTHER_NS_DENY_ALL,
        "ALLOW",
        req("default/client", dest="other/web"),
        False,
        "other/deny-everything",
        "DENY policy other/deny-everything rules[0] matched",
    ),
    (
        "selector: unselected service is not governed by the ALLOW policy",
        ALLOW_FRONTEND,
        "ALLOW",
        req("default/client", dest="default/api"),
        True,
        None,
        "no ALLOW policy applies to service api",
    ),
    (
        "selector: selected service also sees namespace-wide policies",
        join(ALLOW_FRONTEND, ALLOW_MONITORING),
        "DENY",
        req("monitoring/prometheus", dest="default/web", port=15020),
        True,
        "default/allow-monitoring",
        "ALLOW policy default/allow-monitoring rules[0] matched",
    ),
    (
        "source services: any of the workload's services matches",
        ALLOW_FRONTEND,
        "DENY",
        req("default/gateway", services=frozenset({"gateway", "frontend"})),
        True,
        "default/allow-frontend",
        "rules[0] matched",
    ),
    (
        "ports: other port does not match",
        ALLOW_MONITORING,
        "ALLOW",
        req("monitoring/prometheus", port=8080),
        False,
        None,
        "no ALLOW rule matched (applicable: default/allow-monitoring)",
    ),
    (
        "empty ALLOW policy (no rules) allows nothing",
        "kind: AuthorizationPolicy\nmetadata: {name: lockdown}\nspec: {action: ALLOW}\n",
        "ALLOW",
        req(),
        False,
        None,
        "no ALLOW rule matched (applicable: default/lockdown)",
    ),
    (
        "empty DENY policy (no rules) denies nothing",
        "kind: AuthorizationPolicy\nmetadata: {name: nothing}\nspec: {action: DENY}\n",
        "ALLOW",
        req(),
        True,
        None,
        "default action ALLOW",
    ),
    (
        "empty rule {} matches everything",
        ALLOW_ALL_IN_NS,
        "DENY",
        req("elsewhere/anyone", port=1),
        True,
        "default/allow-all",
        "rules[0] matched",
    ),
]


@pytest.mark.parametrize(
    ("text", "default_action", "request_", "allowed", "policy", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decisions(
    text: str,
    default_action: str,
    request_: AuthzRequest,
    allowed: bool,
    policy: str | None,
    reason: str,
) -> None:
    decision = decide(text, request_, default_action)
    assert decision.allowed is allowed
    assert decision.policy == policy
    assert reason in decision.reason


def _allow_rule(rule: str) -> Authorizer:
    text = f"""
kind: AuthorizationPolicy
metadata: {{name: r}}
spec:
  action: ALLOW
  rules: [{rule}]
"""
    return Authorizer(policies(text), default_action="ALLOW")


# (rule, request, allowed) -- one field at a time, then combinations
RULE_CASES = [
    # principals: exact
    ("{from: {principals: ['spiffe://cluster.local/ns/default/sa/client']}}", req(), True),
    ("{from: {principals: ['spiffe://cluster.local/ns/default/sa/clien']}}", req(), False),
    ("{from: {principals: ['spiffe://other.td/ns/default/sa/client']}}", req(), False),
    # principals: trailing wildcard
    ("{from: {principals: ['spiffe://cluster.local/ns/default/sa/*']}}", req(), True),
    ("{from: {principals: ['spiffe://cluster.local/ns/default/sa/*']}}", req("prod/x"), False),
    ("{from: {principals: ['spiffe://cluster.local/ns/default/sa/*']}}", req(), True),
    (
        "{from: {principals: ['spiffe://cluster.local/ns/default/*']}}",
        req("default-x/client"),
        False,
    ),
    ("{from: {principals: ['spiffe://cluster.local/*']}}", req("prod/x"), True),
    ("{from: {principals: ['spiffe://*']}}", req(), True),
    # OR within a list
    (
        "{from: {principals: ['spiffe://cluster.local/ns/a/sa/b', "
        "'spiffe://cluster.local/ns/default/sa/client']}}",
        req(),
        True,
    ),
    # not_principals
    ("{from: {not_principals: ['spiffe://cluster.local/ns/default/sa/client']}}", req(), False),
    ("{from: {not_principals: ['spiffe://cluster.local/ns/default/sa/*']}}", req(), False),
    ("{from: {not_principals: ['spiffe://cluster.local/ns/default/sa/*']}}", req("b/x"), True),
    # namespaces / not_namespaces
    ("{from: {namespaces: [default, prod]}}", req("prod/x"), True),
    ("{from: {namespaces: [prod]}}", req(), False),
    ("{from: {not_namespaces: [prod]}}", req(), True),
    ("{from: {not_namespaces: [prod]}}", req("prod/x"), False),
    # services / not_services
    ("{from: {services: [client]}}", req(), True),
    ("{from: {services: [web]}}", req(), False),
    ("{from: {not_services: [client]}}", req(), False),
    ("{from: {not_services: [debug]}}", req(services=frozenset({"client", "debug"})), False),
    ("{from: {not_services: [debug]}}", req(), True),
    ("{from: {services: [client]}}", req(services=frozenset()), False),
    # ports / not_ports
    ("{to: {ports: [80, 8080]}}", req(port=8080), True),
    ("{to: {ports: [80]}}", req(port=8080), False),
    ("{to: {not_ports: [8080]}}", req(port=8080), False),
    ("{to: {not_ports: [8080]}}", req(port=443), True),
    # AND across fields
    ("{from: {namespaces: [default], services: [client]}, to: {ports: [8080]}}", req(), True),
    ("{from: {namespaces: [default], services: [client]}, to: {ports: [80]}}", req(), False),
    ("{from: {namespaces: [default], not_services: [client]}}", req(), False),
    ("{from: {namespaces: [default]}, to: {ports: [8080], not_ports: [8080]}}", req(), False),
]


@pytest.mark.parametrize(("rule", "request_", "allowed"), RULE_CASES)
def test_rule_fields(rule: str, request_: AuthzRequest, allowed: bool) -> None:
    decision = _allow_rule(rule).check(request_)
    assert decision.allowed is allowed, decision.reason
    assert decision.policy == ("default/r" if allowed else None)


def test_first_matching_rule_is_named() -> None:
    authz = Authorizer(
        [
            AuthorizationPolicy(
                name="multi",
                action="DENY",
                rules=(
                    Rule(to=Destination(ports=(22,))),
                    Rule(from_=Source(namespaces=("default",))),
                    Rule(),
                ),
            )
        ]
    )
    assert authz.check(req(port=22)).reason == "DENY policy default/multi rules[0] matched"
    assert authz.check(req()).reason == "DENY policy default/multi rules[1] matched"
    assert authz.check(req("prod/x")).reason == "DENY policy default/multi rules[2] matched"


def test_decision_is_independent_of_policy_order() -> None:
    a = AuthorizationPolicy(name="a", action="ALLOW", rules=(Rule(),))
    b = AuthorizationPolicy(name="b", action="ALLOW", rules=(Rule(),))
    d1 = AuthorizationPolicy(name="d1", action="DENY", rules=(Rule(),))
    d2 = AuthorizationPolicy(name="d2", action="DENY", rules=(Rule(),))
    assert Authorizer([b, a]).check(req()).policy == "default/a"
    assert Authorizer([d2, b, d1, a]).check(req()).policy == "default/d1"


def test_applicable_lists_policies_per_destination() -> None:
    authz = Authorizer(
        policies(join(ALLOW_FRONTEND, DENY_BATCH, ALLOW_MONITORING, OTHER_NS_DENY_ALL))
    )
    assert authz.applicable("default", "web") == (
        "default/deny-batch",
        "default/allow-frontend",
        "default/allow-monitoring",
    )
    assert authz.applicable("default", "api") == (
        "default/deny-batch",
        "default/allow-monitoring",
    )
    assert authz.applicable("other", "web") == ("other/deny-everything",)
    assert authz.applicable("nowhere", "web") == ()


def test_selector_with_several_services() -> None:
    policy = AuthorizationPolicy(
        name="p",
        action="ALLOW",
        selector=Selector(("web", "api")),
        rules=(Rule(from_=Source(services=("frontend",))),),
    )
    authz = Authorizer([policy])
    for dest in ("default/web", "default/api"):
        assert not authz.check(req(dest=dest)).allowed
        assert authz.check(req("default/frontend", dest=dest)).allowed
    assert authz.check(req(dest="default/db")).allowed  # not selected: default ALLOW


def test_from_resources_uses_mesh_config_default() -> None:
    resources = parse_documents(
        join(
            DENY_BATCH,
            "kind: MeshConfig\nmetadata: {name: default}\n"
            "spec: {authorization: {default_action: DENY}}\n",
            "kind: PeerAuthentication\nmetadata: {name: p}\nspec: {mode: STRICT}\n",
        )
    )
    authz = Authorizer.from_resources(resources)
    assert authz.default_action == "DENY"
    assert authz.check(req()) == AuthzDecision(
        False,
        None,
        "no ALLOW policy applies to service web in namespace default: default action DENY",
    )
    assert authz.check(req("default/batch")).policy == "default/deny-batch"
    assert Authorizer.from_resources([]).default_action == "ALLOW"


def test_bad_default_action_is_rejected() -> None:
    with pytest.raises(ValueError, match="default_action must be one of ALLOW, DENY"):
        Authorizer([], default_action="allow")


def test_decisions_are_frozen_values() -> None:
    decision = Authorizer([]).check(req())
    with pytest.raises(AttributeError):
        decision.allowed = False  # type: ignore[misc]


# --- the examples of docs/policies.md, "Matching, exactly": each row is a test -------

DOC = REPO / "docs" / "policies.md"


def _doc_rows() -> list[tuple[str, str, str, str, str]]:
    text = DOC.read_text()
    section = text.split("## Matching, exactly", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("principals", "namespaces", "services"):
            rows.append((cells[0], cells[1], cells[2], cells[3], cells[4]))
    return rows


def test_the_doc_has_examples() -> None:
    assert len(_doc_rows()) >= 8


@pytest.mark.parametrize("field, pattern, source, backs, verdict", _doc_rows())
def test_doc_example(field: str, pattern: str, source: str, backs: str, verdict: str) -> None:
    """A policy in namespace `shop` allowing only `from: {FIELD: [PATTERN]}`."""
    text = (
        "kind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n"
        f"spec: {{action: ALLOW, rules: [{{from: {{{field}: ['{pattern}']}}}}]}}\n"
    )
    identity = SpiffeId.parse(source)
    request = AuthzRequest(
        source=identity,
        source_services=frozenset(b for b in backs.split(",") if b and b != "-"),
        dest_service="web",
        dest_namespace="shop",
        dest_port=8080,
    )
    assert verdict in ("yes", "no")
    assert decide(text, request).allowed == (verdict == "yes"), (field, pattern, source)
