"""The ``fedsilo`` command: a thin dispatcher over each package's own CLI module.

Each package registers its subcommands with ``add_commands(subparsers)``; handlers return
an exit code. Heavy imports (torch, Flower, MONAI) happen inside handlers only, so that
``fedsilo audit verify`` works with a small install.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from fedsilo import __version__
from fedsilo.errors import EXIT_BAD_INPUT, FedsiloError

# Modules that own a subcommand group, in the order `fedsilo --help` lists them.
COMMAND_MODULES = (
    "fedsilo.demo_cli",
    "pipelines.cli",
    "silo_agent.cli",
    "coordinator.cli",
    "compliance.cli",
    "fedsilo.bench_cli",
)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(EXIT_BAD_INPUT, f"fedsilo: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsilo", description="Cross-silo federated learning for hospitals.")
    parser.add_argument("--version", action="version", version=f"fedsilo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a package not built yet must not break the others
            if exc.name != name:
                raise
            continue
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedsiloError as exc:
        print(f"fedsilo: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedsilo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. '| head'): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
