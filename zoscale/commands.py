"""What `zoscale train | export | replay` do (argument parsing is in cli.py)."""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from zoscale.config import ConfigError, load

QUICKSTART = Path(str(resources.files("zoscale.quickstart") / "quickstart.yaml"))


def _fresh_directory(path: Path, flag: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{flag} {path} exists and is not empty; choose another directory (nothing was overwritten)")


def train(args) -> int:
    code = _train(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Ranks of a torch.distributed job sometimes abort in interpreter teardown after a clean run
        # ("terminate called without an active exception"): leave with the real exit code instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(args) -> int:
    from zoscale.trainer import NonFiniteLossError, Trainer, resumed_config

    if args.resume is not None:
        if args.config is not None or args.overrides or args.out is not None:
            raise ConfigError("--resume continues a run as configured: only --steps and --backend may change")
        if not (args.resume / "config.yaml").is_file():
            raise ConfigError(f"--resume: {args.resume} is not a run directory (no config.yaml)")
        cfg, run_dir = resumed_config(args.resume, args.steps, args.backend), args.resume
    else:
        overrides = list(args.overrides)
        if args.steps is not None:
            overrides.append(f"steps={args.steps}")
        if args.backend is not None:
            overrides.append(f"backend={args.backend}")
        cfg = load(args.config, overrides, defaults=QUICKSTART)
        if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--out is required when the launcher starts several ranks")
        task = Path(cfg.data.task).stem
        run_dir = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{task}-{cfg.optim.name}"
        _fresh_directory(run_dir, "--out")
    trainer = Trainer(cfg, run_dir, resume=args.resume is not None)
    try:
        trainer.run()
    except NonFiniteLossError as e:
        print(f"zoscale: error: {e}", flush=True)
        return 1
    finally:
        trainer.backend.teardown()
    if trainer.comm.is_main:
        print(f"run directory: {run_dir}")
    return 0


def _run_config(run: Path):
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run directory (no config.yaml)")
    return load(run / "config.yaml")


def _initial_model(run: Path):
    """The run's model before training (from its config) and tokenizer."""
    from zoscale.models import build_model, build_tokenizer

    cfg = _run_config(run)
    if cfg.model.config is not None and cfg.model.init_device != "cpu":
        raise ConfigError(f"{run} drew its random weights on its device (model.init_device); they cannot be "
                          f"rebuilt here")
    tokenizer = build_tokenizer(cfg.model)
    return cfg, build_model(cfg.model, vocab_size=len(tokenizer)), tokenizer


def _save_pretrained(model, tokenizer, out: Path) -> None:
    from zoscale.models import unwrap

    unwrap(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


def export(args) -> int:
    from zoscale import checkpoint
    from zoscale.export import export_pretrained
    from zoscale.models import build_tokenizer, snapshot
    from zoscale.shards import local_shards

    _fresh_directory(args.out, "--out")
    source = checkpoint.latest(args.run / ("checkpoints" if args.checkpoint == "latest" else "best"))
    if source is None:
        raise ConfigError(f"{args.run} has no {args.checkpoint} checkpoint")
    cfg = _run_config(args.run)
    pretrained = snapshot(cfg.model.name_or_path) if cfg.model.name_or_path and cfg.model.lora is None else None
    if pretrained is not None and list(pretrained.glob("*.safetensors")):  # file by file, never the whole model
        export_pretrained(cfg.model, pretrained, source, build_tokenizer(cfg.model), args.out)
        print(f"wrote {args.out}: the files of {pretrained} with the trained parameters, one file at a time")
        return 0
    _, model, tokenizer = _initial_model(args.run)
    checkpoint.read_shards(source, local_shards(model))  # the pieces of every rank, into whole parameters
    _save_pretrained(model, tokenizer, args.out)
    return 0


def replay(args) -> int:
    """Apply the logged updates (seeds and coefficients) to the initial weights, in order."""
    from zoscale.shards import PerturbationEngine, local_shards

    _fresh_directory(args.out, "--out")
    cfg, model, tokenizer = _initial_model(args.run)
    log = args.run / "seeds.jsonl"
    if not log.is_file():
        raise ConfigError(f"{args.run} has no seeds.jsonl")
    master = torch.float32 if cfg.model.master_weights else None
    distribution = cfg.optim.options.get("distribution", "gaussian")
    engine = PerturbationEngine(local_shards(model, master_dtype=master), distribution)
    steps = 0
    with open(log) as f:
        for line in f:
            entry = json.loads(line)
            for update in entry["updates"]:
                if update is None:
                    raise ConfigError(f"step {entry['step']} of {args.run} used a buffer ({cfg.optim.name}): "
                                      f"its update is not a function of seeds alone, so it cannot be replayed")
                engine.update({int(s): c for s, c in update["terms"]}, update["decay"])
                engine.flush()
            steps += 1
    print(f"replayed {steps} steps")
    _save_pretrained(model, tokenizer, args.out)
    return 0
