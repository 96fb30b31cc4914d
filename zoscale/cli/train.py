"""`zoscale train`: finetune a model (no arguments: the CPU quickstart)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zoscale.cli import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (default: configs/quickstart.yaml)")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<time>-<task>-<optimizer>)")
    parser.add_argument("--resume", type=Path, metavar="RUN", help="continue RUN from its latest checkpoint")
    parser.add_argument("--auto-resume", action="store_true", help="continue --out if it holds this run already, "
                        "else start it (for jobs that are requeued)")
    parser.add_argument("--steps", type=positive_int, help="total steps (overrides the config)")
    parser.add_argument("--backend", help="local | ddp | fsdp | deepspeed (overrides the config)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.epilog = ("Any number of key=value arguments, anywhere, override config keys (e.g. optim.lr=1e-6). The "
                     "config's sections: model.* (the model and its source), data.* (task and sampling), optim.* (the "
                     "optimizer's name and options) and top-level keys (steps, batch_size, backend, ...); every key "
                     "is documented in docs/training.md, and a wrong one is refused with the valid names.")


def run(args) -> int:
    code = _train(args)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # Ranks of a torch.distributed job sometimes abort in interpreter teardown after a clean run
        # ("terminate called without an active exception"): leave with the real exit code instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(args) -> int:
    from zoscale.backends.base import check_launch_environment
    from zoscale.engine import print0
    from zoscale.quickstart import QUICKSTART
    from zoscale.train import resume
    from zoscale.train.rundir import RunDirectory
    from zoscale.train.signals import EXIT_PREEMPTED, exit_when_the_launcher_dies
    from zoscale.train.stall import StalledRun
    from zoscale.train.trainer import NonFiniteLossError, Preempted, Trainer

    plan = resume.plan(args.config, args.overrides, args.out, args.resume, args.auto_resume, args.steps, args.backend,
                       QUICKSTART)
    check_launch_environment(plan.cfg.backend)
    exit_when_the_launcher_dies()
    main = int(os.environ.get("RANK", "0")) == 0
    with RunDirectory(plan.run_dir, fresh=not plan.resume, main=main):
        try:
            trainer = Trainer(plan.cfg, plan.run_dir, resume=plan.resume, auto_resume=plan.auto)
        except resume.RunComplete as e:
            print0(e)
            return 0
        try:
            trainer.run()
        except (NonFiniteLossError, StalledRun) as e:
            if trainer.comm.is_main:
                print(f"zoscale: error: {e}", file=sys.stderr, flush=True)
            return 1
        except Preempted as e:
            if trainer.comm.is_main:
                print(f"zoscale: {e}", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        finally:
            trainer.backend.teardown()
    if trainer.comm.is_main:
        print(f"run directory: {plan.run_dir}")
    return 0
