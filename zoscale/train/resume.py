"""Which run `zoscale train` starts or continues, decided in one place.

``plan`` (the command line, before any process group): a new run, ``--resume RUN``, or
``--auto-resume`` of ``--out`` (a requeued job continues its run, or starts it). ``find_point``
(every rank, in the trainer): the newest complete checkpoint, its checksums verified by the ranks
together, its states read once; a run complete already is ``RunComplete`` under ``--auto-resume``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from zoscale.config import SHARD_SIZE_KEYS, TrainConfig, load, to_dict
from zoscale.engine import Comm, print0
from zoscale.errors import ConfigError
from zoscale.train import checkpoint
from zoscale.train.rundir import read_json

# What a resumed run must share with the checkpoint it continues (the trajectory); the rest
# (steps, backend, evaluation and logging cadence) may change between sessions.
TRAJECTORY_KEYS = ("model", "data", "optim", "objective", "seed", "batch_size")


class RunComplete(Exception):
    """``--auto-resume`` of a run that has reached its steps: nothing to do (the message says so)."""


@dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig
    run_dir: Path
    resume: bool  # continue run_dir from its newest complete checkpoint
    auto: bool = False  # --auto-resume: a complete run is not an error


@dataclass(frozen=True)
class ResumePoint:
    path: Path  # the checkpoint directory
    optimizer_state: dict  # this rank's
    trainer_state: dict


def plan(config: Path | None, overrides: list[str], out: Path | None, resume: Path | None, auto_resume: bool,
         steps: int | None, backend: str | None, defaults: Path) -> RunPlan:
    """The run a `zoscale train` command line names, its config checked."""
    if resume is not None:
        if config is not None or overrides or out is not None or auto_resume:
            raise ConfigError("--resume continues a run as configured: only --steps and --backend may change")
        if not (resume / "config.yaml").is_file():
            raise ConfigError(f"--resume: {resume} is not a run directory (no config.yaml)")
        return RunPlan(resumed_config(resume, steps, backend), resume, resume=True)
    overrides = list(overrides)
    if steps is not None:
        overrides.append(f"steps={steps}")
    if backend is not None:
        overrides.append(f"backend={backend}")
    cfg = load(config, overrides, defaults=defaults)
    if out is None and (os.environ.get("WORLD_SIZE", "1") != "1" or auto_resume):
        raise ConfigError("--out is required when the launcher starts several ranks, and with --auto-resume")
    run_dir = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(cfg.data.task).stem}-{cfg.optim.name}"
    if auto_resume and (run_dir / "config.yaml").is_file():  # a requeued job: continue the run
        saved = resumed_config(run_dir, cfg.steps, cfg.backend)
        new, old = to_dict(cfg), to_dict(saved)
        changed = [k for k in TRAJECTORY_KEYS if new[k] != old[k]]
        if changed:
            raise ConfigError(f"--auto-resume: {run_dir} holds a run with another {changed[0]}; give its "
                              f"config or another --out")
        return RunPlan(saved, run_dir, resume=True, auto=True)
    return RunPlan(cfg, run_dir, resume=False)


def resumed_config(run_dir: Path, steps: int | None, backend: str | None = None) -> TrainConfig:
    """The run's config; the step target and the backend may change (checkpoints hold pieces keyed
    by flat offset, so any backend and world size can continue them)."""
    cfg = load(run_dir / "config.yaml")
    if backend is None or backend == cfg.backend:
        return replace(cfg, steps=steps or cfg.steps)
    # the old backend's layout keys do not carry over to another backend
    return replace(cfg, steps=steps or cfg.steps, backend=backend, **dict.fromkeys(SHARD_SIZE_KEYS.values()))


def find_point(run_dir: Path, cfg: TrainConfig, comm: Comm, auto: bool) -> ResumePoint:
    """The newest complete checkpoint, chosen (and its checksums verified) before any model is built."""
    found = checkpoint.find(run_dir / "checkpoints", comm)
    if found.skipped:
        print0(f"--resume: {found.describe()}")
    if found.path is None:
        raise ConfigError(f"--resume: {run_dir} has no complete checkpoint")
    optimizer_state, trainer_state = checkpoint.load(found.path, comm)
    step = trainer_state["step"]
    if cfg.steps <= step and auto and read_json(run_dir / "summary.json") is None:
        print0(f"{run_dir} is complete at step {step}, but its summary.json is missing or unreadable: evaluating "
               f"its last checkpoint again to write it")
    elif cfg.steps <= step:
        if auto:
            raise RunComplete(f"{run_dir} is complete at step {step}; nothing to do")
        raise ConfigError(f"--resume: {run_dir} is at step {step} already ({found.path.name}); "
                          f"--steps must be larger to continue it (nothing was changed)")
    before, now = trainer_state.get("config"), to_dict(cfg)
    for key in TRAJECTORY_KEYS if before is not None else ():
        if key in before and before[key] != now[key]:  # (checkpoints older than a key lack it)
            raise ConfigError(f"--resume: {key} in {run_dir / 'config.yaml'} differs from what "
                              f"{found.path.name} was trained with ({before[key]} -> {now[key]}); restore it, or "
                              f"start a new run")
    return ResumePoint(found.path, optimizer_state, trainer_state)
