from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from meshnode.core.resources import (
    AuthorizationPolicy,
    Destination,
    MeshConfig,
    PeerAuthentication,
    ResourceError,
    Rule,
    Selector,
    Source,
    TrafficSplit,
    dump_documents,
    parse_documents,
    resource_from_dict,
    resources_from_json,
    resources_to_json,
)

AUTHZ_YAML = """\
kind: AuthorizationPolicy
metadata:
  name: allow-web
  namespace: shop
spec:
  action: ALLOW
  selector:
    services: [web]
  rules:
    - from:
        principals: ["spiffe://cluster.local/ns/shop/sa/*"]
        not_principals: ["spiffe://cluster.local/ns/shop/sa/batch"]
        namespaces: [shop]
        not_namespaces: [legacy]
        services: [frontend, api]
        not_services: [debug]
      to:
        ports: [8080, 8443]
        not_ports: [9090]
    - from:
        namespaces: [monitoring]
      to:
        ports: [15020]
"""

PEER_AUTH_YAML = """\
kind: PeerAuthentication
metadata:
  name: strict-payments
  namespace: shop
spec:
  mode: STRICT
  selector:
    services: [payments]
"""

SPLIT_YAML = """\
kind: TrafficSplit
metadata:
  name: reviews-canary
spec:
  service: reviews
  weights:
    v1: 90
    v2: 10
"""

MESH_CONFIG_YAML = """\
kind: MeshConfig
metadata:
  name: default
spec:
  authorization:
    default_action: DENY
"""

ALL_YAML = "---\n".join([AUTHZ_YAML, PEER_AUTH_YAML, SPLIT_YAML, MESH_CONFIG_YAML])


def test_each_kind_parses_to_the_expected_value() -> None:
    authz, peer, split, mesh = parse_documents(ALL_YAML, "all.yaml")
    assert authz == AuthorizationPolicy(
        name="allow-web",
        namespace="shop",
        action="ALLOW",
        selector=Selector(("web",)),
        rules=(
            Rule(
                from_=Source(
                    principals=("spiffe://cluster.local/ns/shop/sa/*",),
                    not_principals=("spiffe://cluster.local/ns/shop/sa/batch",),
                    namespaces=("shop",),
                    not_namespaces=("legacy",),
                    services=("frontend", "api"),
                    not_services=("debug",),
                ),
                to=Destination(ports=(8080, 8443), not_ports=(9090,)),
            ),
            Rule(from_=Source(namespaces=("monitoring",)), to=Destination(ports=(15020,))),
        ),
    )
    assert authz.key == ("AuthorizationPolicy", "shop", "allow-web")
    assert authz.ref == "shop/allow-web"
    assert peer == PeerAuthentication(
        name="strict-payments", namespace="shop", mode="STRICT", selector=Selector(("payments",))
    )
    assert split == TrafficSplit(
        name="reviews-canary", service="reviews", weights=(("v1", 90), ("v2", 10))
    )
    assert split.key == ("TrafficSplit", "default", "reviews-canary")
    assert mesh == MeshConfig(default_action="DENY")
    assert mesh.key == ("MeshConfig", "default", "default")


@pytest.mark.parametrize(
    "text",
    [
        AUTHZ_YAML,
        PEER_AUTH_YAML,
        SPLIT_YAML,
        MESH_CONFIG_YAML,
        # minimal forms: defaults and empty pieces
        "kind: AuthorizationPolicy\nmetadata: {name: deny-all}\nspec: {action: ALLOW}\n",
        "kind: AuthorizationPolicy\nmetadata: {name: any}\nspec: {action: DENY, rules: [{}]}\n",
        "kind: PeerAuthentication\nmetadata: {name: p}\nspec: {mode: PERMISSIVE}\n",
        "kind: MeshConfig\nmetadata: {name: default}\nspec: {}\n",
    ],
)
def test_round_trips(text: str) -> None:
    (resource,) = parse_documents(text)
    assert type(resource).from_dict(resource.to_dict()) == resource
    assert resource_from_dict(resource.to_dict()) == resource
    assert parse_documents(dump_documents([resource])) == [resource]
    # through real JSON text, as in a snapshot
    as_json = json.loads(json.dumps(resources_to_json([resource])))
    assert resources_from_json(as_json) == [resource]


def test_multi_document_dump_parse_round_trip() -> None:
    resources = parse_documents(ALL_YAML)
    assert len(resources) == 4
    text = dump_documents(resources)
    assert text.count("---") == 4
    assert parse_documents(text) == resources
    assert resources_from_json(resources_to_json(resources)) == resources


def test_defaults_and_empty_documents() -> None:
    text = "---\n# just a comment\n---\n" + SPLIT_YAML + "---\n"
    (split,) = parse_documents(text)
    assert isinstance(split, TrafficSplit)
    assert split.namespace == "default"
    assert parse_documents("") == []
    (mesh,) = parse_documents("kind: MeshConfig\nmetadata: {name: default}\nspec: {}\n")
    assert mesh == MeshConfig(default_action="ALLOW")
    (policy,) = parse_documents(
        "kind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: ALLOW}\n"
    )
    assert isinstance(policy, AuthorizationPolicy)
    assert policy.rules == () and policy.selector is None


def test_wildcard_principals_accepted() -> None:
    for principal in [
        "spiffe://*",
        "spiffe://cluster.local/*",
        "spiffe://cluster.local/ns/*",
        "spiffe://cluster.local/ns/shop/*",
        "spiffe://cluster.local/ns/shop/sa/*",
    ]:
        assert Source(principals=(principal,)).principals == (principal,)


@pytest.mark.parametrize(
    "principal, fix",
    [
        ("spiffe://cluster.local/ns/shop/sa/web-*", "spiffe://cluster.local/ns/shop/sa/*"),
        ("spiffe://cluster.local/ns/prod*", "spiffe://cluster.local/ns/*"),
        ("spiffe://cluster.local/ns/prod/s*", "spiffe://cluster.local/ns/prod/*"),
        ("spiffe://cluster*", "spiffe://*"),
    ],
)
def test_wildcards_must_cover_whole_segments(principal: str, fix: str) -> None:
    with pytest.raises(ResourceError, match="whole path segments") as err:
        Source(principals=(principal,))
    assert f'write "{fix}"' in str(err.value)


@pytest.mark.parametrize("service", ["web", "shop/web"])
def test_source_services_may_name_a_namespace(service: str) -> None:
    assert Source(services=(service,)).services == (service,)


@pytest.mark.parametrize("service", ["a/b/c", "Shop/web", "shop/", "/web"])
def test_source_services_refuse_other_shapes(service: str) -> None:
    with pytest.raises(ResourceError):
        Source(services=(service,))


def _doc(spec: str, kind: str = "AuthorizationPolicy", name: str = "p") -> str:
    return f"kind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n"


def _rule(rule: str) -> str:
    return _doc(f"{{action: ALLOW, rules: [{rule}]}}")


# (document text, expected field path, a fragment of the problem)
INVALID = [
    ("kind: Gateway\nmetadata: {name: g}\nspec: {}\n", "kind", 'unknown kind "Gateway"'),
    ("metadata: {name: g}\nspec: {}\n", "kind", "required field is missing"),
    ("kind: MeshConfig\nmetadata: {}\nspec: {}\n", "metadata.name", "required field is missing"),
    (
        "kind: TrafficSplit\nmetadata: {name: s, namespace: Shop}\n"
        "spec: {service: web, weights: {v1: 1}}\n",
        "metadata.namespace",
        '"Shop" is not a DNS label',
    ),
    (_doc("{action: ALLOW}", name="web.v1"), "metadata.name", '"web.v1" is not a DNS label'),
    (
        "kind: PeerAuthentication\nmetadata: {name: p, labels: {}}\nspec: {mode: STRICT}\n",
        "metadata.labels",
        "unknown field (allowed: name, namespace)",
    ),
    (
        "kind: PeerAuthentication\nmetadata: {name: p}\nspec: {mode: STRICT}\nstatus: {}\n",
        "status",
        "unknown field",
    ),
    (_doc("{acton: ALLOW}"), "spec.acton", 'did you mean "action"?'),
    (_doc("{action: allow}"), "spec.action", '"allow" is not one of ALLOW, DENY'),
    (_doc("{rules: []}"), "spec.action", "required field is missing"),
    (_doc("{action: ALLOW, rules: {}}"), "spec.rules", "expected a list, found a mapping"),
    (_rule("{form: {namespaces: [a]}}"), "spec.rules[0].form", 'did you mean "from"?'),
    (
        _rule("{from: {principals: ['spiffe://cluster.local/ns/a/sa/b', 'spiffe://x']}}"),
        "spec.rules[0].from.principals[1]",
        '"spiffe://x" is not a SPIFFE ID (expected spiffe://<trust-domain>/ns/<ns>/sa/<sa>)',
    ),
    (
        _rule("{from: {not_principals: ['spiffe://td/ns/*/sa/web']}}"),
        "spec.rules[0].from.not_principals[0]",
        "is not a SPIFFE ID",
    ),
    (
        _rule("{from: {principals: ['spiffe://td/ns/a/sa/b/*']}}"),
        "spec.rules[0].from.principals[0]",
        "not a SPIFFE ID prefix followed by one trailing '*'",
    ),
    (_rule("{from: {principals: ['*']}}"), "spec.rules[0].from.principals[0]", "prefix"),
    (_rule("{from: {namespaces: []}}"), "spec.rules[0].from.namespaces", "must not be empty"),
    (_rule("{from: {services: [Web]}}"), "spec.rules[0].from.services[0]", "not a DNS label"),
    (_rule("{to: {ports: [0]}}"), "spec.rules[0].to.ports[0]", "port 0 is out of range 1-65535"),
    (_rule("{to: {ports: [65536]}}"), "spec.rules[0].to.ports[0]", "out of range"),
    (
        _rule("{to: {not_ports: [80, '80']}}"),
        "spec.rules[0].to.not_ports[1]",
        'expected a port number (an integer 1-65535), found a string "80"',
    ),
    (_rule("{to: {ports: [true]}}"), "spec.rules[0].to.ports[0]", "found a boolean true"),
    (
        _doc("{action: DENY, selector: {services: []}}"),
        "spec.selector.services",
        "omit the selector",
    ),
    (
        _doc("{service: web, weights: {v1: 0, v2: 0}}", kind="TrafficSplit"),
        "spec.weights",
        "at least one weight must be > 0",
    ),
    (
        _doc("{service: web, weights: {v1: -5}}", kind="TrafficSplit"),
        "spec.weights.v1",
        "weight must be an integer >= 0, found an integer -5",
    ),
    (
        _doc("{service: web, weights: {V1: 5}}", kind="TrafficSplit"),
        "spec.weights.V1",
        '"V1" is not a DNS label',
    ),
    (
        _doc("{service: web, weights: [v1]}", kind="TrafficSplit"),
        "spec.weights",
        "expected a mapping of version to weight",
    ),
    (_doc("{weights: {v1: 1}}", kind="TrafficSplit"), "spec.service", "required field"),
    (_doc("{mode: LENIENT}", kind="PeerAuthentication"), "spec.mode", "not one of STRICT"),
    (
        _doc("{}", kind="MeshConfig", name="mesh"),
        "metadata.name",
        'MeshConfig must be named "default"',
    ),
    (
        "kind: MeshConfig\nmetadata: {name: default, namespace: shop}\nspec: {}\n",
        "metadata.namespace",
        "mesh-wide",
    ),
    (
        _doc("{authorization: {default_action: REJECT}}", kind="MeshConfig", name="default"),
        "spec.authorization.default_action",
        '"REJECT" is not one of ALLOW, DENY',
    ),
    ("- kind: MeshConfig\n", "", "expected a mapping with kind, metadata and spec, found a list"),
    ("just text\n", "", 'found a string "just text"'),
    ("kind: PeerAuthentication\nmetadata: {name: p}\n", "spec", "required field is missing"),
    ("kind: PeerAuthentication\nmetadata: {name: p}\nspec:\n", "spec", "found null"),
]


@pytest.mark.parametrize(("text", "path", "problem"), INVALID)
def test_invalid_documents_name_the_field(text: str, path: str, problem: str) -> None:
    with pytest.raises(ResourceError) as info:
        parse_documents(text, "bad.yaml")
    err = info.value
    assert err.path == path
    assert problem in err.problem
    assert err.where.startswith("bad.yaml: document 1")
    assert str(err) == ": ".join(part for part in (err.where, path, err.problem) if part)


def test_error_message_names_document_index_and_name() -> None:
    text = (
        _doc("{action: ALLOW}", name="ok")
        + "---\n"
        + _rule("{from: {principals: [spiffe://x]}}").replace("name: p", "name: deny-web")
    )
    with pytest.raises(ResourceError) as info:
        parse_documents(text, "policy.yaml")
    assert str(info.value) == (
        "policy.yaml: document 2 (AuthorizationPolicy deny-web): "
        "spec.rules[0].from.principals[0]: "
        '"spiffe://x" is not a SPIFFE ID (expected spiffe://<trust-domain>/ns/<ns>/sa/<sa>)'
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("kind: MeshConfig\nmetadata: {name: default\nspec: {}\n", 3),
        ("kind: MeshConfig\nspec:\n  a: b\n c: d\n", 4),
        (_doc("{action: ALLOW}") + "---\nkind: [\n", 6),
    ],
)
def test_yaml_syntax_error_has_line_number(text: str, line: int) -> None:
    with pytest.raises(ResourceError) as info:
        parse_documents(text, "bad.yaml")
    assert str(info.value).startswith(f"bad.yaml: line {line}, column ")
    assert "invalid YAML" in str(info.value)


def test_duplicate_yaml_key_is_an_error() -> None:
    text = "kind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  mode: STRICT\n"
    text += "  mode: PERMISSIVE\n"
    with pytest.raises(ResourceError, match=r'bad.yaml: line 5, .*duplicate key "mode"'):
        parse_documents(text, "bad.yaml")


def test_yaml_merge_keys_still_work() -> None:
    text = textwrap.dedent("""\
        kind: AuthorizationPolicy
        metadata: {name: p}
        spec:
          action: ALLOW
          rules:
            - from: &base {namespaces: [a], services: [x]}
            - from:
                <<: *base
                services: [y]
        """)
    (policy,) = parse_documents(text)
    assert isinstance(policy, AuthorizationPolicy)
    assert policy.rules[1].from_ == Source(namespaces=("a",), services=("y",))


def test_one_bad_document_rejects_the_whole_set() -> None:
    assert len(parse_documents(ALL_YAML)) == 4
    text = ALL_YAML + "---\n" + _doc("{action: MAYBE}", name="broken")
    result = None
    with pytest.raises(ResourceError) as info:
        result = parse_documents(text, "set.yaml")
    assert result is None  # nothing returned: the four good documents are not applied either
    assert info.value.where == "set.yaml: document 5 (AuthorizationPolicy broken)"
    assert info.value.path == "spec.action"


def test_duplicate_resources_and_conflicting_splits_are_rejected() -> None:
    twice = _doc("{action: ALLOW}") + "---\n" + _doc("{action: DENY}")
    with pytest.raises(ResourceError) as info:
        parse_documents(twice, "x.yaml")
    assert info.value.where == "x.yaml: document 2 (AuthorizationPolicy p)"
    assert "already defined by x.yaml: document 1" in info.value.problem
    # same name in another namespace is a different resource
    other_ns = (
        _doc("{action: ALLOW}")
        + "---\n"
        + _doc("{action: DENY}").replace("{name: p}", "{name: p, namespace: other}")
    )
    assert len(parse_documents(other_ns)) == 2

    splits = _doc("{service: web, weights: {v1: 1}}", kind="TrafficSplit", name="a") + (
        "---\n" + _doc("{service: web, weights: {v2: 1}}", kind="TrafficSplit", name="b")
    )
    with pytest.raises(ResourceError) as info:
        parse_documents(splits)
    assert info.value.path == "spec.service"
    assert 'service "web" is already split by <input>: document 1' in info.value.problem


def test_resources_from_json_errors_name_the_item() -> None:
    items = resources_to_json(parse_documents(ALL_YAML))
    items[2]["spec"]["weights"] = {"v1": 0}
    with pytest.raises(ResourceError) as info:
        resources_from_json(items, "snapshot.json")
    assert str(info.value).startswith(
        "snapshot.json: resources[2] (TrafficSplit reviews-canary): spec.weights: "
    )
    with pytest.raises(ResourceError, match="expected a list of resources"):
        resources_from_json({"kind": "MeshConfig"})


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda: AuthorizationPolicy(name="p", action="PERMIT"), "spec.action"),
        (lambda: AuthorizationPolicy(name="P", action="ALLOW"), "metadata.name"),
        (lambda: Source(principals=("spiffe://td/ns/a",)), "principals[0]"),
        (lambda: Destination(not_ports=(80, 0)), "not_ports[1]"),
        (lambda: Selector(()), "services"),
        (lambda: TrafficSplit(name="s", service="web", weights=()), "spec.weights"),
        (
            lambda: TrafficSplit(name="s", service="web", weights=(("v", 1), ("v", 2))),
            "spec.weights.v",
        ),
        (lambda: MeshConfig(name="other"), "metadata.name"),
    ],
)
def test_direct_construction_is_validated_too(build: object, path: str) -> None:
    assert callable(build)
    with pytest.raises(ResourceError) as info:
        build()
    assert info.value.path == path


def test_meshconfig_dns_domain_round_trips_and_is_checked() -> None:
    doc = {
        "kind": "MeshConfig",
        "metadata": {"name": "default"},
        "spec": {"dns": {"domain": "mesh.internal"}},
    }
    mesh = MeshConfig.from_dict(doc)
    assert mesh.dns_domain == "mesh.internal"
    assert MeshConfig.from_dict(mesh.to_dict()) == mesh
    assert "dns" not in MeshConfig().to_dict()["spec"]  # the default is not written out
    for bad in ("Mesh", "a..b", "", "-x", 7):
        with pytest.raises(ResourceError, match="spec.dns.domain"):
            MeshConfig.from_dict({**doc, "spec": {"dns": {"domain": bad}}})


# --- TrafficSplit by zone --------------------------------------------------------------

ZONES_YAML = """\
kind: TrafficSplit
metadata: {name: api-zones}
spec:
  service: api
  zones: {zone-a: 80, zone-b: 20}
"""


def test_zone_split_parses_round_trips_and_keeps_document_order() -> None:
    (split,) = parse_documents(ZONES_YAML)
    assert split == TrafficSplit(
        name="api-zones", service="api", zones=(("zone-a", 80), ("zone-b", 20))
    )
    assert isinstance(split, TrafficSplit) and split.weights == ()
    assert split.to_dict() == {
        "kind": "TrafficSplit",
        "metadata": {"name": "api-zones", "namespace": "default"},
        "spec": {"service": "api", "zones": {"zone-a": 80, "zone-b": 20}},
    }
    assert TrafficSplit.from_dict(split.to_dict()) == split
    assert parse_documents(dump_documents([split])) == [split]
    assert resources_from_json(json.loads(json.dumps(resources_to_json([split])))) == [split]
    # A zone of weight 0 is kept (it says "never", as for versions), in its place.
    (zero,) = parse_documents(ZONES_YAML.replace("zone-b: 20", "zone-b: 0, zone-c: 20"))
    assert isinstance(zero, TrafficSplit)
    assert zero.zones == (("zone-a", 80), ("zone-b", 0), ("zone-c", 20))
    assert TrafficSplit.from_dict(zero.to_dict()) == zero


def test_version_split_documents_are_written_exactly_as_before() -> None:
    # Byte for byte what TrafficSplit wrote before it could split by zone.
    (split,) = parse_documents(SPLIT_YAML)
    assert json.dumps(split.to_dict()) == (
        '{"kind": "TrafficSplit", "metadata": {"name": "reviews-canary", "namespace": '
        '"default"}, "spec": {"service": "reviews", "weights": {"v1": 90, "v2": 10}}}'
    )
    assert dump_documents([split]) == (
        "---\nkind: TrafficSplit\nmetadata:\n  name: reviews-canary\n  namespace: default\n"
        "spec:\n  service: reviews\n  weights:\n    v1: 90\n    v2: 10\n"
    )
    assert isinstance(split, TrafficSplit) and split.zones == ()


def _zones(zones: str) -> str:
    return _doc(f"{{service: api, zones: {zones}}}", kind="TrafficSplit")


ZONE_SPLIT_INVALID = [
    (_zones("{zone-a: 0, zone-b: 0}"), "spec.zones", "at least one weight must be > 0"),
    (
        _zones("{zone-a: -1}"),
        "spec.zones.zone-a",
        "weight must be an integer >= 0, found an integer -1",
    ),
    (_zones("{zone-a: true}"), "spec.zones.zone-a", "found a boolean true"),
    (_zones("{zone-a: '80'}"), "spec.zones.zone-a", 'found a string "80"'),
    (_zones("{zone-a: 1.5}"), "spec.zones.zone-a", "found a number 1.5"),
    (_zones("{Zone-A: 5}"), "spec.zones.Zone-A", '"Zone-A" is not a DNS label'),
    (_zones("{zone_a: 5}"), "spec.zones.zone_a", '"zone_a" is not a DNS label'),
    (_zones("{1: 5}"), "spec.zones.1", "expected a string (a DNS label), found an integer 1"),
    (_zones("[zone-a]"), "spec.zones", "expected a mapping of zone to weight, found a list"),
    (_zones("{}"), "spec.zones", "must name at least one zone"),
    (_zones("null"), "spec.zones", "expected a mapping of zone to weight, found null"),
    (
        _doc("{service: api, weights: {v1: 1}, zones: {zone-a: 1}}", kind="TrafficSplit"),
        "spec",
        'give "weights" (a split by version) or "zones" (a split by zone), not both',
    ),
    (
        _doc("{service: api}", kind="TrafficSplit"),
        "spec",
        'required field is missing: "weights" (a split by version) or "zones"',
    ),
    (
        _doc("{service: api, zone: {zone-a: 1}}", kind="TrafficSplit"),
        "spec.zone",
        'did you mean "zones"?',
    ),
    (_doc("{zones: {zone-a: 1}}", kind="TrafficSplit"), "spec.service", "required field"),
]


@pytest.mark.parametrize(("text", "path", "problem"), ZONE_SPLIT_INVALID)
def test_zone_split_refusals_name_the_field(text: str, path: str, problem: str) -> None:
    test_invalid_documents_name_the_field(text, path, problem)


def test_zone_named_twice_is_refused() -> None:
    with pytest.raises(ResourceError, match='duplicate key "zone-a"'):
        parse_documents(_zones("{zone-a: 1, zone-a: 2}"), "bad.yaml")
    with pytest.raises(ResourceError) as info:
        TrafficSplit(name="s", service="api", zones=(("zone-a", 1), ("zone-a", 2)))
    assert (info.value.path, info.value.problem) == ("spec.zones.zone-a", "zone appears twice")


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (
            lambda: TrafficSplit(name="s", service="api", weights=(("v1", 1),), zones=(("a", 1),)),
            "spec",
        ),
        (lambda: TrafficSplit(name="s", service="api", zones=(("a", 0),)), "spec.zones"),
        (lambda: TrafficSplit(name="s", service="api", zones=(("A", 1),)), "spec.zones.A"),
        (lambda: TrafficSplit(name="s", service="api"), "spec.weights"),  # neither: as before
    ],
)
def test_zone_split_direct_construction_is_validated(build: object, path: str) -> None:
    test_direct_construction_is_validated_too(build, path)


def test_a_service_is_split_one_way() -> None:
    # One TrafficSplit per service: by version or by zone (the set's rule, unchanged).
    text = SPLIT_YAML + "---\n" + ZONES_YAML.replace("service: api", "service: reviews")
    with pytest.raises(ResourceError) as info:
        parse_documents(text)
    assert info.value.path == "spec.service"
    assert 'service "reviews" is already split by <input>: document 1' in info.value.problem


def test_the_traffic_split_examples_of_the_docs_parse() -> None:
    doc = Path(__file__).resolve().parents[3] / "docs" / "policies.md"
    section = doc.read_text().split("## TrafficSplit", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    splits = [r for b in blocks for r in parse_documents(b, "docs/policies.md")]
    assert all(isinstance(s, TrafficSplit) for s in splits)
    assert [(s.name, s.to_dict()["spec"].keys() - {"service"}) for s in splits] == [
        ("reviews-canary", {"weights"}),
        ("api-zones", {"zones"}),
    ]
