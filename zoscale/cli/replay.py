"""`zoscale replay RUN --out DIR`: a run's final parameters rebuilt from its initial weights and
its seed log alone (every update as seeds and coefficients)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoscale.cli.export import initial_model, save_pretrained
from zoscale.errors import ConfigError
from zoscale.train.rundir import require_fresh


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)


def run(args) -> int:
    """Apply the logged updates (seeds and coefficients) to the initial weights, in order."""
    import torch

    from zoscale.engine import PerturbationEngine, local_shards

    require_fresh(args.out, "--out")
    cfg, model, tokenizer = initial_model(args.run)
    log = args.run / "seeds.jsonl"
    if not log.is_file():
        raise ConfigError(f"{args.run} has no seeds.jsonl")
    master = torch.float32 if cfg.model.master_weights else None
    distribution = cfg.optim.options.get("distribution", "gaussian")
    version = cfg.optim.options.get("stream", "v1")
    engine = PerturbationEngine(local_shards(model, master_dtype=master), distribution, version=version)
    steps = 0
    with open(log) as f:
        for line in f:
            entry = json.loads(line)
            if "header" in entry:  # a log without a header was written on v1
                logged = entry["header"].get("stream", "v1")
                if logged != version:
                    raise ConfigError(f"{log} was written on perturbation stream {logged}, but config.yaml says "
                                      f"{version}; restore config.yaml's optim.stream")
                continue
            for update in entry["updates"]:
                if update is None:
                    raise ConfigError(f"step {entry['step']} of {args.run} used a buffer ({cfg.optim.name}): "
                                      f"its update is not a function of seeds alone, so it cannot be replayed")
                engine.update({int(s): c for s, c in update["terms"]}, update["decay"])
                engine.flush()
            steps += 1
    print(f"replayed {steps} steps")
    save_pretrained(model, tokenizer, args.out)
    return 0
