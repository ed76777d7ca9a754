"""Helpers shared by the tests: skips, BPF and lab fixtures, the nspawn node
harness, the in-process control plane, and the small tools (``tools/``) that
tests run inside lab nodes."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tests" / "support" / "tools"
