"""The ``structxlip`` command line: composes the library's commands and the orchestration commands."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    from flows import commands as flow_commands
    from structxlip.app import commands as library_commands
    parser = argparse.ArgumentParser(
        prog="structxlip",
        description="StructXLIP: structure-map data preparation (Prefect pipeline), fine-tuning and retrieval evaluation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    flow_commands.register(subparsers)
    library_commands.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line to stderr and exit with status 2."""
    command = "structxlip"
    try:  # a Ctrl-C while the command still imports or parses ends it with the same one line
        from configs import ConfigError

        args = build_parser().parse_args(argv)
        command = f"structxlip {args.command}"
        try:
            return int(args.handler(args) or 0)
        except (ConfigError, OSError, ValueError, RuntimeError) as exc:
            # Known, user-facing failures (bad input or config, a full or read-only disk): one clear line, no traceback.
            from storage.filenames import display_path  # undecodable file-name bytes as \xNN, not a crash

            print(f"{command}: error: {display_path(str(exc))}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
