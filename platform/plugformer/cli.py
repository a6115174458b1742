"""The ``plugformer`` command: ``train`` (Hydra), ``generate``, ``eval``, ``plugins``, ``compare``, ``new``, ``sweep``,
``import-hf`` and ``export-hf``."""

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
    _add_compare(commands)
    _add_generate(commands)
    _add_eval(commands)
    _add_new(commands)
    _add_sweep(commands)
    # Provided by the built-in retrieval plugin through the cli_commands hook; listed here so
    # --help shows it without loading plugins.
    commands.add_parser(
        "index", help="build a kNN-LM datastore of a run: plugformer index RUN_DIR [data.OPTION=...] [split=train] [index.type=flat|ivf|hnsw]",
        add_help=False,
    )
    _add_hf(commands)

    if not args:
        parser.print_help()
        return 2
    try:
        return _dispatch(parser, args, [name for name in commands.choices if name not in PLUGIN_COMMANDS])
    except PlugformerError as error:
        if full_tracebacks_requested():
            raise
        return report_user_error(error)


#: Commands of built-in plugins that --help lists; they, and any name the CLI does not know,
#: run through the plugins' ``cli_commands`` hook.
PLUGIN_COMMANDS = ("index",)


def _dispatch(parser: argparse.ArgumentParser, args: list[str], builtin: Sequence[str]) -> int:
    if not args[0].startswith("-") and args[0] not in builtin:
        from plugformer.plugin_commands import run_plugin_command

        return run_plugin_command(args[0], args[1:], builtin)
    if args[0] == "train":  # Hydra parses the rest, -m and --help included
        from plugformer.launch import launch_training

        return launch_training(args[1:])
    if args[0] == "eval":  # -m may follow the run directories (as in `plugformer train`)
        sweep = any(a in ("-m", "--multirun") for a in args[1:])
        args = [a for a in args if a not in ("-m", "--multirun")]
    parsed = parser.parse_args(args)
    if parsed.command == "plugins":
        from plugformer.listing import print_plugins

        print_plugins(as_json=parsed.json)
        return 0
    if parsed.command == "compare":
        from plugformer.compare import compare_command

        return compare_command(
            parsed.paths,
            out=parsed.out,
            eval_metrics=_comma_list([parsed.eval_metrics]),
            curves=_comma_list(parsed.curves or []),
            smooth=parsed.smooth,
            group_by=_comma_list(parsed.group_by or []),
            reports=tuple(parsed.reports or ()),
            wandb=parsed.wandb,
            wandb_group=parsed.wandb_group,
        )
    if parsed.command == "new":
        from plugformer.scaffold import new_plugin_command

        return new_plugin_command(parsed.name, parsed.kind, parsed.dir)
    if parsed.command == "sweep":
        from pathlib import Path

        if parsed.service == "slurm":
            from plugformer.slurm import write_slurm_scripts

            study = Path(parsed.study) if parsed.study else None
            paths = write_slurm_scripts(parsed.overrides, study=study, out=Path(parsed.out) if parsed.out else None)
            print(f"wrote {len(paths)} sbatch script(s) to {paths[0].parent} (nothing submitted):")
            print("\n".join(f"  {path}" for path in paths))
            return 0
        from plugformer.wandb_sweep import write_wandb_sweep

        out = write_wandb_sweep(Path(parsed.study), Path(parsed.out) if parsed.out else None, project=parsed.project)
        print(f"wrote {out}\n  start it with: wandb sweep {out}   then: wandb agent <the sweep id it prints>")
        return 0
    if parsed.command == "import-hf":
        from plugformer.hf.convert import import_command

        return import_command(parsed.arguments)
    if parsed.command == "export-hf":
        from plugformer.hf.convert import export_command

        return export_command(parsed.run_dir, parsed.out_dir, parsed.checkpoint)
    if parsed.command == "generate":
        from plugformer.model.generation import DecodingConfig
        from plugformer.prompting import generate_command

        config = DecodingConfig(
            strategy=parsed.strategy, max_new_tokens=parsed.max_new_tokens, temperature=parsed.temperature,
            top_k=parsed.top_k, top_p=parsed.top_p, min_p=parsed.min_p, num_beams=parsed.beams,
            length_penalty=parsed.length_penalty, seed=parsed.seed, use_cache=parsed.cache,
        )
        return generate_command(parsed.run_dir, parsed.prompt, parsed.prompts_file, config, checkpoint=parsed.checkpoint, as_json=parsed.json)
    if parsed.command == "eval":
        from plugformer.evaluation import eval_command

        run_dirs = [a for a in parsed.arguments if "=" not in a]
        overrides = [a for a in parsed.arguments if "=" in a]
        return eval_command(
            run_dirs, overrides, sweep=sweep, split=parsed.split, checkpoint=parsed.checkpoint,
            limit_batches=parsed.limit_batches, allow_untrained_positions=parsed.allow_untrained_positions,
        )
    parser.print_help()
    return 2


def _add_compare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("compare", help="compare runs: differing config values and metrics, groups over seeds, curves, reports")
    parser.add_argument("paths", nargs="*", help="run directories, or folders holding them")
    parser.add_argument("--out", default=None, help="folder for comparison.csv/.md/.png and the curve figures")
    parser.add_argument(
        "--curve", "--metric", dest="curves", action="append", metavar="METRIC",
        help="a metric to plot by step (repeatable or comma-separated; default: the monitored val metric)",
    )
    parser.add_argument("--smooth", type=float, default=0.0, metavar="W", help="EMA smoothing weight of the curves, 0 <= W < 1 (as W&B/TensorBoard)")
    parser.add_argument(
        "--group-by", action="append", metavar="KEY",
        help="config key or component kind to group runs by (repeatable or comma-separated; default: runs differing only in seed)",
    )
    parser.add_argument("--report", dest="reports", action="append", metavar="FILE", help="write a report: FILE.html (self-contained) or FILE.md")
    parser.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT", help="also read the runs of this W&B project (online)")
    parser.add_argument("--wandb-group", default=None, metavar="GROUP", help="only the W&B runs of this group (an experiment_name)")
    parser.add_argument(
        "--eval-metrics", default="loss", help="comma-separated metrics of `plugformer eval` results to show (eval/<split>@<length>/...)"
    )


def _comma_list(values: list[str]) -> tuple[str, ...]:
    """Repeated options whose values may also be comma-separated, in order, without blanks."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


def _add_generate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate", help="generate from a finished run: continue prompts, translate sources, fill <mask>s"
    )
    parser.add_argument("run_dir", help="the run directory `plugformer train` wrote")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); token ids for runs without a tokenizer")
    parser.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    parser.add_argument("--strategy", choices=["greedy", "sample", "beam"], default="greedy")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample within the nucleus of this mass (1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this share of the top probability")
    parser.add_argument("--beams", type=int, default=4, help="beam width for --strategy beam")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length**penalty")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache", dest="cache", action="store_true", default=None, help="decode with the attention state (default when supported)")
    cache.add_argument("--no-cache", dest="cache", action="store_false", help="recompute the whole sequence at every step")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def _add_hf(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("import-hf", help="convert a local Hugging Face GPT-2 or Llama model into a run directory")
    parser.add_argument(
        "arguments", nargs="+", metavar="MODEL_DIR|run_dir=PATH|data.OPTION=VALUE",
        help="the model folder (config.json + model.safetensors), then run_dir=... and data overrides",
    )
    parser = commands.add_parser("export-hf", help="write a GPT-2 or Llama run as config.json + model.safetensors for transformers")
    parser.add_argument("run_dir", help="a run directory (trained or imported)")
    parser.add_argument("out_dir", help="the folder to write")
    parser.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")


def _add_sweep(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("sweep", help="a study for W&B sweeps or SLURM: plugformer sweep wandb|slurm ...")
    services = parser.add_subparsers(dest="service", metavar="SERVICE", required=True)
    wandb = services.add_parser("wandb", help="write the W&B sweep YAML of a study file")
    wandb.add_argument("study", help="a study file (a Hydra primary config with hydra.sweeper.params)")
    wandb.add_argument("--out", default=None, help="the W&B sweep YAML to write (default: <study>.wandb.yaml)")
    wandb.add_argument("--project", default=None, help="the W&B project of the sweep")
    slurm = services.add_parser("slurm", help="write (not submit) the sbatch script of every job of a sweep")
    slurm.add_argument("--study", default=None, help="a study file whose grid to use")
    slurm.add_argument("--out", default=None, help="the scripts' folder (default: <sweep dir>/slurm)")
    slurm.add_argument("overrides", nargs="*", help="train overrides, sweeps (a,b) included, hydra.launcher.* too")


def _add_new(commands: argparse._SubParsersAction) -> None:
    # The kinds are listed here rather than imported, so --help stays import-light;
    # plugformer.scaffold.SCAFFOLD_KINDS is the same tuple (tests/test_scaffold.py checks).
    kinds = ("attention", "position", "norm", "ffn", "objective", "data", "technique")
    parser = commands.add_parser("new", help="start something new: plugformer new plugin <name> --kind <kind>")
    what = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    plugin = what.add_parser("plugin", help="create a ready plugin package (entry point, component, tests, README)")
    plugin.add_argument("name", help="the component's name, a lowercase identifier such as talking_heads")
    plugin.add_argument("--kind", required=True, choices=kinds, help="the kind of component")
    plugin.add_argument("--dir", default=None, help="folder to create the package in (default: the current folder)")


def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate finished runs: loss, perplexity and metrics on any split, data or length (-m sweeps)"
    )
    parser.add_argument(
        "arguments", nargs="+", metavar="RUN_DIR|data.OPTION=VALUE",
        help="one or more run directories, then data overrides such as data.block_size=256",
    )
    parser.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated override values")
    parser.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    parser.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    parser.add_argument("--limit-batches", type=int, default=None, help="evaluate only this many batches")
    parser.add_argument(
        "--allow-untrained-positions", action="store_true",
        help="score lengths beyond training even with per-position parameters (learned positions)",
    )


if __name__ == "__main__":
    sys.exit(main())
