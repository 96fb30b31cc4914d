"""`zoscale bench quadratic | step`: benchmarks that write reports; each report names the hardware it ran on."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from zoscale.cli import positive_int
from zoscale.errors import ConfigError


def cpu_description() -> str:
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model or platform.machine()}, {os.cpu_count()} cores"


def device_description(device=None) -> str:
    """The GPU's name when the run uses one (``device``: a torch.device), else the CPU's."""
    import torch

    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    return cpu_description()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench = parser.add_subparsers(dest="bench", required=True)
    quad = bench.add_parser("quadratic", help="MeZO vs ConMeZO on ConMeZO's ill-conditioned quadratic")
    quad.add_argument("--dim", type=positive_int, default=1000)
    quad.add_argument("--iters", type=positive_int, default=100_000)
    quad.add_argument("--trials", type=positive_int, default=5)
    quad.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1),
                      help="processes running trials in parallel")
    quad.add_argument("--buffer-dtype", choices=("float64", "float32", "bfloat16"), default="float64",
                      help="ConMeZO's momentum buffer")
    quad.add_argument("--out", type=Path, required=True, help="report directory (DIR/quadratic.{json,md,png})")
    quad.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    step = bench.add_parser("step", help="ZO step vs two forwards; perturbation pass vs the bandwidth floor")
    step.add_argument("--model", required=True, help="a config.json (configs/models/), a model directory or hub id "
                      "(its config only: random weights)")
    step.add_argument("--batch", type=positive_int, default=16)
    step.add_argument("--seq", type=positive_int, default=128)
    step.add_argument("--optimizer", default="mezo", help="a registered optimizer whose step needs only the loss")
    step.add_argument("--backend", choices=("local", "ddp", "fsdp", "deepspeed"), default="local")
    step.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    step.add_argument("--repeats", type=positive_int, default=10)
    step.add_argument("--out", type=Path, required=True, help="report directory")
    step.add_argument("--deepspeed-config", help="a ZeRO-3 JSON for --backend deepspeed (e.g. configs/deepspeed/"
                      "zero3_offload.json)")
    step.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    step.add_argument("--defer-update", action="store_true",
                      help="the optimizer's defer_update: two passes a step, the update folded into the next "
                      "perturbation")
    step.add_argument("--stream", choices=("v1", "v2"), default="v1", help="the perturbation stream's version")
    step.add_argument("--no-reference", action="store_true", help="leave out the reference MeZO step (4 passes)")


def run(args) -> int:
    return (_quadratic if args.bench == "quadratic" else _step)(args)


def _step(args) -> int:
    from zoscale.cli.bench import step
    from zoscale.cli.plan import load_model_config
    from zoscale.config import check_deepspeed_json
    from zoscale.optim import REGISTRY

    cls = REGISTRY.get(args.optimizer)
    if cls is None or cls.needs != ("loss",):
        raise ConfigError(f"--optimizer: {args.optimizer!r} is not a registered optimizer whose step needs only the "
                          f"loss; choose one of {sorted(n for n, c in REGISTRY.items() if c.needs == ('loss',))}")
    try:
        load_model_config(args.model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {args.model}: {str(e).splitlines()[0]}") from None
    if args.defer_update and "defer_update" not in cls.Config.__dataclass_fields__:
        raise ConfigError(f"--defer-update: {args.optimizer} has no defer_update option")
    name = step.report_name(args.model, args.backend, args.optimizer, args.deepspeed_config, args.defer_update,
                            args.stream)
    report = args.out / f"{name}.json"
    if report.exists() and not args.force:
        raise ConfigError(f"{report} exists; pass --force to overwrite it")
    if args.deepspeed_config is not None:
        from zoscale.backends.deepspeed import offload_device

        if args.backend != "deepspeed":
            raise ConfigError("--deepspeed-config: only with --backend deepspeed")
        check_deepspeed_json(args.deepspeed_config)
        if offload_device(args.deepspeed_config) == "nvme":
            raise ConfigError("--deepspeed-config: the step benchmark times passes over partitions in memory, not "
                              "on NVMe")
    r = step.run(args.model, args.batch, args.seq, args.optimizer, args.backend, args.dtype, args.repeats, args.out,
                 args.deepspeed_config, args.defer_update, args.stream, not args.no_reference)
    print(step.markdown(r))
    return 0


def _quadratic(args) -> int:
    if (args.out / "quadratic.json").exists() and not args.force:
        raise ConfigError(f"{args.out / 'quadratic.json'} exists; pass --force to overwrite it")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is not a directory")
    from zoscale.cli.bench import quadratic

    cfg = quadratic.QuadraticConfig(dim=args.dim, iters=args.iters, trials=args.trials, buffer_dtype=args.buffer_dtype)
    summary = quadratic.run(cfg, args.out, workers=args.workers)
    speedup = summary["speedup"]
    print(f"speedup {speedup:.2f}x" if speedup else "ConMeZO did not reach MeZO's final value",
          f"- report in {args.out}/quadratic.md")
    return 0
