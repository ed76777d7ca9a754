"""Helpers shared by the command modules."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click


def fail(message: str, code: int = 1) -> NoReturn:
    """An expected failure: one clear line on stderr, no traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
