"""The `streamem` command line.

Library commands live here; commands that need Kafka (`run`, `demo`) are
registered by the connectors package through the `streamem.commands` entry-point
group, so this module never imports `connectors` (imports point down the layers).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from streamem import __version__

    parser = argparse.ArgumentParser(prog="streamem", description="Online EM for Gaussian and regression mixtures.")
    parser.add_argument("--version", action="version", version=f"streamem {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group="streamem.commands"), key=lambda e: e.name):
        register = entry.load()
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", None) or "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
