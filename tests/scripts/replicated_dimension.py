"""Rank program: ConMeZO over whole (replicated) parameters with a data-parallel comm and no
shard_comm: its dimension must count each element once, not once per rank.
Usage: torchrun ... replicated_dimension.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import zoscale
from zoscale.engine.comm import Comm


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 10)
    opt = zoscale.build_optimizer("conmezo", zoscale.local_shards(model), comm=Comm(), lr=1e-3)
    numel = sum(p.numel() for p in model.parameters())
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps({"dim": opt.dim, "numel": numel}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
