"""Library subcommands of the ``structxlip`` CLI (train, evaluate, export-json, import-json, build-tiny-clip)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the library's subcommands to the top-level parser."""
