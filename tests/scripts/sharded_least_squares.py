"""Rank program: a zoscale optimizer on least squares, parameters *and* data split unevenly over ranks.

Each rank owns a slice of every parameter (a Shard with its global offset), all-gathers the full
parameters for its forward (as FSDP does) and evaluates its own share of each batch.
Usage: torchrun ... sharded_least_squares.py OUT_DIR STEPS OPTIMIZER OPTIONS_JSON
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import zoscale
from zoscale.engine import Shard
from zoscale.engine.comm import Comm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import least_squares, run_steps, split_evenly  # noqa: E402


def main(out_dir: Path, steps: int, optimizer: str, options: dict) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    params, features, targets = least_squares()
    shards, full_views = [], {}
    for name, p in params.items():
        a, b = split_evenly(p.numel(), world)[rank]
        local = p.view(-1)[a:b].clone()
        shards.append(Shard(name, local, offset=a, global_numel=p.numel(), weight_decay=p.dim() >= 2))
        full_views[name] = (local, p)

    def gather() -> dict[str, torch.Tensor]:
        full = {}
        for name, (local, p) in full_views.items():
            pieces = [None] * world
            dist.all_gather_object(pieces, local)
            full[name] = torch.cat(pieces).view_as(p)
        return full

    def predict(index):
        full = gather()
        return features[index] @ full["weight"].view(-1) + full["bias"].sum()

    opt = zoscale.build_optimizer(optimizer, shards, comm=Comm(), **options)
    pgs = run_steps(opt, predict, targets, rank, world, steps)
    full = gather()
    result = {"rank": rank, "world": world, "projected_grads": pgs,
              "params": {k: v.view(-1).tolist() for k, v in full.items()}}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
