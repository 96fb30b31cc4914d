"""The `zoscale` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


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

    bench = sub.add_parser("bench", help="benchmarks that write reports").add_subparsers(dest="bench", required=True)
    quad = bench.add_parser("quadratic", help="MeZO vs ConMeZO on ConMeZO's ill-conditioned quadratic")
    quad.add_argument("--dim", type=_positive_int, default=1000)
    quad.add_argument("--iters", type=_positive_int, default=100_000)
    quad.add_argument("--trials", type=_positive_int, default=5)
    quad.add_argument("--workers", type=_positive_int, default=min(2, os.cpu_count() or 1),
                      help="processes running trials in parallel")
    quad.add_argument("--out", type=Path, required=True, help="report directory (DIR/quadratic.{json,md,png})")
    quad.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    return parser


def _fail(message: str) -> int:
    print(f"zoscale: error: {message}", file=sys.stderr)
    return 2


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
    elif args.command == "bench" and args.bench == "quadratic":
        if (args.out / "quadratic.json").exists() and not args.force:
            return _fail(f"{args.out / 'quadratic.json'} exists; pass --force to overwrite it")
        if args.out.exists() and not args.out.is_dir():
            return _fail(f"--out {args.out} is not a directory")
        from zoscale.bench import quadratic

        cfg = quadratic.QuadraticConfig(dim=args.dim, iters=args.iters, trials=args.trials)
        summary = quadratic.run(cfg, args.out, workers=args.workers)
        speedup = summary["speedup"]
        print(f"speedup {speedup:.2f}x" if speedup else "ConMeZO did not reach MeZO's final value",
              f"- report in {args.out}/quadratic.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
