"""Fuzz target: the mesh DNS answerer, fed arbitrary datagrams. See fuzz/README.md.

python fuzz/fuzz_dns.py fuzz/corpus/dns -runs=1000000
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports():
    import dns.message  # noqa: F401
    import dns.name  # noqa: F401
    import dns.wire  # noqa: F401

    from meshnode.ztunnel import dns as mesh_dns  # noqa: F401

import dns_harness  # noqa: E402


def test_one_input(data: bytes) -> None:
    dns_harness.one_input(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
