"""The fuzz targets (fuzz/): every input of the checked-in corpus replayed
through the harness (no atheris needed), then, if atheris is installed, a few
seconds of real fuzzing per target. The long run is in fuzz/README.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import REPO

FUZZ = REPO / "fuzz"


def _load_harness(name: str = "harness") -> ModuleType:
    """fuzz/harness.py is a script folder's module, not part of the package."""
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
dns_harness = _load_harness("dns_harness")
ingress_harness = _load_harness("ingress_harness")

SIDES = {"server": False, "client": True}
TARGETS = {
    "server": "fuzz_hbone_server.py",
    "client": "fuzz_hbone_client.py",
    "dns": "fuzz_dns.py",
    "ingress": "fuzz_ingress.py",
}


@pytest.mark.parametrize("side", list(SIDES))
def test_corpus_replays_cleanly(side: str) -> None:
    inputs = sorted((FUZZ / "corpus" / side).iterdir())
    assert inputs, "no seeds: run python fuzz/make_corpus.py"
    for path in inputs:
        harness.one_input(path.read_bytes(), client_side=SIDES[side])


def test_dns_corpus_replays_cleanly() -> None:
    inputs = sorted((FUZZ / "corpus" / "dns").iterdir())
    assert inputs, "no seeds: run python fuzz/make_corpus.py"
    for path in inputs:
        dns_harness.one_input(path.read_bytes())


def test_ingress_corpus_replays_cleanly() -> None:
    inputs = sorted((FUZZ / "corpus" / "ingress").iterdir())
    assert inputs, "no seeds: run python fuzz/make_corpus.py"
    for path in inputs:
        ingress_harness.one_input(path.read_bytes())


def test_the_ingress_harness_finds_what_it_looks_for() -> None:
    """The harness can fail: a routing that sends a zone SNI to a node of another
    zone is caught (with a seed that names the served service)."""
    from meshnode.ztunnel.ingress import IngressRoute

    seeds = [p.read_bytes() for p in sorted((FUZZ / "corpus" / "ingress").iterdir())]
    real = ingress_harness.route_server_name

    def leaky(state: object, name: str) -> object:
        route = real(state, name)
        if isinstance(route, IngressRoute):
            return IngressRoute(route.sni, (*route.targets, ("10.1.0.1", 15008)))
        return route

    ingress_harness.route_server_name = leaky
    try:
        with pytest.raises(AssertionError):
            for seed in seeds:
                ingress_harness.one_input(seed)
    finally:
        ingress_harness.route_server_name = real


def test_the_dns_harness_finds_what_it_looks_for() -> None:
    """The harness can fail: an answerer that gives a reply another ID is caught."""
    from meshnode.ztunnel.dns import Reply

    seed = next(iter(sorted((FUZZ / "corpus" / "dns").iterdir()))).read_bytes()
    real = dns_harness.ANSWERER.handle

    def wrong_id(data: bytes, tcp: bool = False) -> object:
        decision = real(data, tcp)
        if isinstance(decision, Reply):
            return Reply(b"\xff\xff" + decision.wire[2:], decision.rcode, decision.qtype)
        return decision

    dns_harness.ANSWERER.handle = wrong_id
    try:
        with pytest.raises(AssertionError, match="another ID"):
            dns_harness.one_input(b"\x12\x34" + seed[2:])
    finally:
        del dns_harness.ANSWERER.handle


@pytest.mark.parametrize("side", list(TARGETS))
def test_fuzz_target_smoke_run(side: str, tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        reason = f"atheris is not importable ({exc}); pip install -e '.[fuzz]'"
        print(f"skipping the fuzz smoke run: {reason}")
        pytest.skip(reason)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in (FUZZ / "corpus" / side).iterdir():
        (corpus / seed.name).write_bytes(seed.read_bytes())
    proc = subprocess.run(
        [
            sys.executable,
            str(FUZZ / TARGETS[side]),
            str(corpus),
            "-max_total_time=4",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr
