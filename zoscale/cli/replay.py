"""`zoscale replay RUN --out DIR`: a run's final parameters rebuilt from its initial weights and
its seed log alone (every update as seeds and coefficients)."""

from __future__ import annotations

import argparse
from pathlib import Path

from zoscale.cli.export import initial_model, save_pretrained
from zoscale.errors import ConfigError
from zoscale.train.rundir import require_fresh, require_writable
from zoscale.train.runlog import read_records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)


def run(args) -> int:
    """Apply the logged updates (seeds and coefficients) to the initial weights, in order."""
    import torch

    from zoscale.engine import PerturbationEngine, local_shards

    require_fresh(args.out, "--out")
    require_writable(args.out, "--out")
    cfg, model, tokenizer = initial_model(args.run)
    log = args.run / "seeds.jsonl"
    if not log.is_file():
        raise ConfigError(f"{args.run} has no seeds.jsonl")
    master = torch.float32 if cfg.model.master_weights else None
    records = [r for _, r in read_records(log, "replay")]
    # the run as it was: the seed log's header names its stream and distribution (a log without one: v1)
    header = records[0]["header"] if records and "header" in records[0] else {}
    properties = {"stream": header.get("stream", "v1"), "distribution": header.get("distribution")}
    for key, logged in properties.items():
        configured = cfg.optim.options.get(key, {"stream": "v1", "distribution": "gaussian"}[key])
        if logged is not None and logged != configured:
            what = "perturbation stream" if key == "stream" else key
            raise ConfigError(f"{log} was written with {what} {logged}, but config.yaml says {configured}; restore "
                              f"config.yaml's optim.{key}")
    distribution = properties["distribution"] or cfg.optim.options.get("distribution", "gaussian")
    engine = PerturbationEngine(local_shards(model, master_dtype=master), distribution, version=properties["stream"])
    steps = 0
    for entry in records[1 if header else 0 :]:
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
