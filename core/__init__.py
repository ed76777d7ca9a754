"""meshnode's shared core: what more than one component needs.

Identities (``identity``), PKI helpers (``pki``), atomic file writes
(``fsutil``), the join token (``token``), policy resources (``resources``), the
typed wire contracts between components (``contracts``), well-known ports and
addresses (``constants``) and the one error base (``errors``).

The import rule (docs/architecture.md, enforced by tests/unit/core/test_import_contract.py):
``core`` imports no other part of meshnode; ztunnel, nodeagent and controlplane
import ``core`` (and ``bpf``), never each other.
"""
