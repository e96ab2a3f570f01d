"""Orchestration subcommands of the ``structxlip`` CLI (run, demo, serve)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the orchestration subcommands to the top-level parser."""
