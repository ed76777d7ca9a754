"""Fuzz target: the zone ingress's SNI peek and routing, fed arbitrary bytes
from the network. See fuzz/README.md.

python fuzz/fuzz_ingress.py fuzz/corpus/ingress -runs=1000000
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports():
    from meshnode.core import identity  # noqa: F401
    from meshnode.ztunnel import ingress  # noqa: F401

import ingress_harness  # noqa: E402


def test_one_input(data: bytes) -> None:
    ingress_harness.one_input(data)


def main() -> None:
    # The fuzzer is a hostile peer by design: what it makes us refuse is logged.
    # Quiet in the fuzzing process only (not where the harness is imported).
    logging.disable(logging.CRITICAL)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
