"""The one place input files are opened, so tests can inject read failures (tests run as root, where
``chmod 000`` does not stop a read) and the builder can map OS errors to named reasons."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO


def open_input(path: str | Path) -> BinaryIO:
    """Open an input file for binary reading."""
    return open(path, "rb")  # noqa: SIM115 - the caller closes it
