"""System tests: real kernels, processes and servers. Every test here carries
the ``root`` marker, so ``pytest -m 'not root'`` leaves them out; each one still
skips on its own, with the reason, where a capability is missing."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/system/" in str(item.path):
            item.add_marker(pytest.mark.root)
