"""The `zoscale` command."""

from __future__ import annotations

import argparse
import json
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoscale", description="Zeroth-order finetuning of sharded LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="MeZO finetunes a tiny OPT on a synthetic prompt task (CPU, ~1 min)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="MeZO steps (default 6000)")
    demo.add_argument("--lr", type=_positive_float, default=None)
    demo.add_argument("--eps", type=_positive_float, default=None)
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from zoscale import demo

        overrides = {k: v for k, v in vars(args).items() if k in ("steps", "lr", "eps", "seed") and v is not None}
        result = demo.run(demo.DemoConfig(**overrides))
        if args.json:
            print(json.dumps(result))
        else:
            print(f"MeZO on a {result['parameters']:,}-parameter OPT, {result['steps']} steps in "
                  f"{result['seconds']:.0f} s: eval accuracy {result['eval_before']:.3f} -> {result['eval_after']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
