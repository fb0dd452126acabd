"""The ``mednext`` command: one subcommand per module in this package.

Each module ``mednext.cli.<name>`` defines ``add_parser(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returns an exit code). Modules
import heavy dependencies inside ``func`` so that ``mednext --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import sys

from mednext.errors import UserError
from mednext.version import __version__

# Order shown in --help.
COMMANDS = [
    "plan", "train", "predict", "evaluate", "compare", "find_best", "ensemble", "postprocess", "env",
    "upkern", "export", "summary", "demo", "benchmark",
]  # fmt: skip


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
        if isinstance(err, FileNotFoundError) and err.filename is not None:
            print(f"mednext {args.command}: error: {os_error_message(err)}", file=sys.stderr)
        else:
            print(f"mednext {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"mednext {args.command}: error: {os_error_message(err)}", file=sys.stderr)
        return 2


_OS_FIXES = {
    errno.ENOSPC: "free space on that disk (or choose a folder on another one) and run the command again",
    errno.EDQUOT: "free space within your disk quota and run the command again",
    errno.EACCES: "choose a folder you may write to, or change its permissions",
    errno.EPERM: "choose a folder you may write to, or change its permissions",
    errno.EROFS: "that file system is read-only: choose a folder on a writable one",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or choose another path",
    errno.EEXIST: "a file stands where a folder is needed: move it away or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: choose another path",
    errno.ENOENT: "check the path",
}


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: the path, the cause and what to do. Files written
    before it stay complete (every write is atomic); nothing half-written is left under a final name."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    cause = err.strerror or str(err)
    fix = _OS_FIXES.get(err.errno or -1, "")
    return f"{paths + ': ' if paths else ''}{cause}" + (f"; {fix}" if fix else "")


if __name__ == "__main__":
    sys.exit(main())
