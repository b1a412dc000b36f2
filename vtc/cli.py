"""The ``vtc`` command line: ``demo``, ``eval``, ``bench``, ``tune``, ``calibrate``, ``viz``, each a
thin face over a library function (:mod:`vtc.commands`). ``vtc COMMAND --help`` explains every
option with an example.

    vtc demo                                   # the shapes benchmark, short (a few minutes, offline)
    vtc demo --full                            # all budgets and DyMU presets (about 30 minutes on 2 cores)
    vtc eval --models shapes-llava --reducers holov pool --budgets 64
    vtc calibrate --model shapes-vit --preset mid --out cal/shapes-vit-mid
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vtc.commands import COMMANDS
from vtc.records import installed_version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vtc {installed_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        command = importlib.import_module(f"vtc.commands.{name}").add_parser(commands)
        command.set_defaults(command_parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vtc`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
