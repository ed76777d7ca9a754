"""Fuzz target: the outbound (client) side of an HBONE connection, fed
arbitrary steps after a real handshake (one tunnel open). See fuzz/README.md.

    python fuzz/fuzz_hbone_client.py fuzz/corpus/client -runs=1000000
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports():
    import h2.connection  # noqa: F401
    import h2.frame_buffer  # noqa: F401
    import h2.stream  # noqa: F401
    import hpack  # noqa: F401
    import hyperframe.frame  # noqa: F401

    from meshnode.ztunnel import h2compat, hbone  # noqa: F401

import harness  # noqa: E402


def test_one_input(data: bytes) -> None:
    harness.one_input(data, client_side=True)


def main() -> None:
    # The fuzzer is a hostile peer by design: what it makes us refuse is logged.
    # Quiet in the fuzzing process only (not where the harness is imported).
    logging.disable(logging.CRITICAL)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
