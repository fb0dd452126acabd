"""The ``mednext`` command: one subcommand per module in this package.

Each module ``mednext.cli.<name>`` defines ``add_parser(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returns an exit code). Modules
import heavy dependencies inside ``func`` so that ``mednext --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from mednext.errors import UserError
from mednext.version import __version__

# Order shown in --help.
COMMANDS = ["plan", "train", "predict", "evaluate", "upkern", "export", "summary", "demo", "benchmark"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mednext", description="MedNeXt for 2D and 3D medical image segmentation")
    parser.add_argument("--version", action="version", version=f"mednext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"mednext.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"mednext {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
