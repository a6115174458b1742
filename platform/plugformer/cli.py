"""The ``plugformer`` command: ``train`` (Hydra), ``plugins`` and ``compare``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from plugformer.errors import PlugformerError, full_tracebacks_requested, report_user_error


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m plugformer``."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="plugformer",
        description="Compose Transformer variants from plugins, train them, compare runs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_parser = commands.add_parser(
        "train", help="train a model: plugformer train [hydra overrides], -m for a sweep", add_help=False
    )
    train_parser.add_argument("overrides", nargs=argparse.REMAINDER)
    plugins_parser = commands.add_parser("plugins", help="list installed plugins and their components")
    plugins_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    compare_parser = commands.add_parser("compare", help="compare runs: differing config values and metrics")
    compare_parser.add_argument("paths", nargs="+", help="run directories, or folders holding them")
    compare_parser.add_argument("--out", default=None, help="folder for comparison.csv/.md/.png")
    compare_parser.add_argument("--metric", default="val/loss", help="the validation curve to plot")

    if not args:
        parser.print_help()
        return 2
    try:
        return _dispatch(parser, args)
    except PlugformerError as error:
        if full_tracebacks_requested():
            raise
        return report_user_error(error)


def _dispatch(parser: argparse.ArgumentParser, args: list[str]) -> int:
    if args[0] == "train":  # Hydra parses the rest, -m and --help included
        from plugformer.launch import launch_training

        return launch_training(args[1:])
    parsed = parser.parse_args(args)
    if parsed.command == "plugins":
        from plugformer.listing import print_plugins

        print_plugins(as_json=parsed.json)
        return 0
    if parsed.command == "compare":
        from plugformer.compare import compare_command

        return compare_command(parsed.paths, out=parsed.out, metric=parsed.metric)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
