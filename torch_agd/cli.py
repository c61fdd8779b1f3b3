"""`agd train | sweep | plot`.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``, imported
only when that subcommand runs, so `agd train` never pays for matplotlib and a missing optional
module disables only its own subcommand. A UsageError, argparse's included, is printed as
one line, ``agd: error: <message>``, with exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from torch_agd.errors import UsageError

SUBCOMMANDS = {
    "train": ("torch_agd.train.run", "train a network (the paper's networks and datasets) and write a run directory"),
    "sweep": ("torch_agd.experiments.sweep", "run a named grid of training runs, skipping finished ones"),
    "plot": ("torch_agd.experiments.plot", "draw the paper's figures from run directories"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _load(name: str):
    module = SUBCOMMANDS[name][0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"agd {name} is unavailable in this installation: {exc}") from None


def build_parser(selected: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    """The parser, with the arguments of the ``selected`` subcommand only, and its module."""
    parser = _Parser(prog="agd", description="Automatic Gradient Descent (Bernstein et al. 2023): "
                     "train the paper's networks, run sweeps, plot figures.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", parser_class=_Parser)
    sub.required = True
    module = None
    for name, (_, text) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=text, description=text)
        if name == selected:
            module = _load(name)
            module.add_arguments(child)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        selected = argv[0] if argv and argv[0] in SUBCOMMANDS else None
        parser, module = build_parser(selected)
        args = parser.parse_args(argv)
        return module.run(args)
    except UsageError as exc:
        print(f"agd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started (a run handles its own, keeping its checkpoint)
        print("agd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
