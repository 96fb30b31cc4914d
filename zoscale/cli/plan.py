"""`zoscale plan`: per-rank memory of a ZO run, estimated without GPUs (the model is built on the
meta device, so no weights are allocated). An estimate from parameter counts and a simple
activation model, not a measurement: `zoscale profile` measures.

    parameter shard     whole parameters (ddp) or 1/N of them (fsdp, deepspeed)
    optimizer buffers   what the optimizer keeps per parameter (ConMeZO's momentum, SVRG's anchor)
    gathered layers     sharded backends: the largest decoder layer whole, twice (one is prefetched)
    gathered root       sharded backends: embeddings, final norm and LM head while the root runs
    activations         no-grad forward: a few hidden-sized tensors and the FFN block per token,
                        attention scores (eager), and the logits
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

from zoscale.cli import positive_float, positive_int
from zoscale.errors import ConfigError

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="config.json file, directory or hub id (configs/models/)")
    parser.add_argument("--backend", choices=("ddp", "fsdp", "deepspeed"), default="fsdp")
    parser.add_argument("--world-size", type=positive_int, nargs="+", default=[8])
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--seq", type=positive_int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--optimizer", default="mezo", help="a registered optimizer (its per-parameter buffers)")
    cluster = parser.add_argument_group("a cluster's layouts (cli/layouts.py): replicas, hybrid, flat, offload")
    cluster.add_argument("--nodes", type=positive_int, help="list the layouts for this many nodes")
    cluster.add_argument("--gpus-per-node", type=positive_int, default=8)
    cluster.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GiB per GPU")
    cluster.add_argument("--intra-gbps", type=positive_float, default=3600.0,
                         help="Gbit/s per GPU and direction within a node (H100 NVLink: 3600)")
    cluster.add_argument("--inter-gbps", type=positive_float, default=400.0,
                         help="Gbit/s per GPU and direction between nodes (one 400G NIC per GPU: 400)")


def run(args) -> int:
    from zoscale.optim import REGISTRY

    if args.optimizer not in REGISTRY:
        raise ConfigError(f"--optimizer: unknown {args.optimizer!r}; choose one of {sorted(REGISTRY)}")
    if args.nodes is not None:
        from zoscale.cli import layouts

        try:
            found = layouts.layouts(args.model, args.nodes, args.gpus_per_node, args.gpu_memory, args.intra_gbps,
                                    args.inter_gbps, args.batch, args.seq, args.dtype, args.optimizer)
        except ConfigError:
            raise
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model {args.model}: {str(e).splitlines()[0]}") from None
        print(layouts.table(Path(args.model).stem, args.nodes, args.gpus_per_node, found))
        print("\n" + layouts.constants_table())
        return 0
    try:
        plans = [plan(args.model, args.backend, n, args.batch, args.seq, args.dtype, args.optimizer)
                 for n in args.world_size]
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {args.model}: {str(e).splitlines()[0]}") from None
    print(table(plans))
    return 0


@dataclass
class MemoryEstimate:
    model: str
    backend: str
    world_size: int
    parameters: int
    bytes_per_parameter: int
    layers: int
    parameter_shard_gib: float
    optimizer_buffers_gib: float
    gathered_layers_gib: float
    gathered_root_gib: float
    activations_gib: float
    total_gib: float


def load_model_config(model: str):
    """A config.json file, a directory holding one, or a hub id (needs network access)."""
    from transformers import AutoConfig

    path = Path(model)
    if path.suffix == ".json":
        import json

        fields = json.loads(path.read_text())
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(model)


@functools.cache  # a cluster's layouts estimate the same model many times
def model_counts(model: str) -> tuple:
    """(config, parameters, decoder layers, elements of the largest layer, elements outside the
    layers), counted on the meta device: tied weights once."""
    import torch
    from transformers import AutoModelForCausalLM

    from zoscale.models import decoder_layers

    cfg = load_model_config(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in net.parameters())
    layers = decoder_layers(net)
    layer_numel = max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
    return cfg, total, len(layers), layer_numel, total - sum(sum(p.numel() for p in m.parameters()) for m in layers)


def plan(model: str, backend: str, world_size: int, batch: int = 16, seq: int = 128, dtype: str = "bfloat16",
         optimizer: str = "mezo", world: int | None = None) -> MemoryEstimate:
    """``world_size``: the ranks a parameter is sharded over; ``world`` (default the same): the
    ranks the batch is split over (more under hybrid sharding)."""
    from zoscale.optim import REGISTRY, optimizer_config

    cfg, total, layers, layer_numel, root_numel = model_counts(model)
    size = BYTES[dtype]
    sharded = backend in ("fsdp", "deepspeed")
    shard = total * size / (world_size if sharded else 1)
    buffer_bytes = REGISTRY[optimizer].buffer_bytes(optimizer_config(optimizer, {}), size)
    buffers = total * buffer_bytes / (world_size if sharded else 1)
    gathered_layers = 2 * layer_numel * size if sharded else 0.0
    gathered_root = root_numel * size if sharded else 0.0
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    ffn = getattr(cfg, "ffn_dim", None) or getattr(cfg, "intermediate_size", 4 * hidden)
    per_rank_batch = batch / (world or world_size) if backend != "local" else batch
    tokens = per_rank_batch * seq
    activations = tokens * (6 * hidden + 2 * ffn) * size + per_rank_batch * heads * seq * seq * size \
        + tokens * cfg.vocab_size * 4
    parts = [shard, buffers, gathered_layers, gathered_root, activations]
    return MemoryEstimate(model=Path(model).stem, backend=backend, world_size=world_size, parameters=total,
                bytes_per_parameter=size, layers=layers,
                parameter_shard_gib=shard / GIB, optimizer_buffers_gib=buffers / GIB,
                gathered_layers_gib=gathered_layers / GIB, gathered_root_gib=gathered_root / GIB,
                activations_gib=activations / GIB, total_gib=sum(parts) / GIB)


def table(plans: list[MemoryEstimate]) -> str:
    rows = ["| model | backend | GPUs | parameters | shard | buffers | gathered layers | gathered root | "
            "activations | total per GPU (GiB) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in plans:
        rows.append(f"| {p.model} | {p.backend} | {p.world_size} | {p.parameters / 1e9:.1f}B | "
                    f"{p.parameter_shard_gib:.1f} | {p.optimizer_buffers_gib:.1f} | {p.gathered_layers_gib:.1f} | "
                    f"{p.gathered_root_gib:.1f} | {p.activations_gib:.1f} | {p.total_gib:.1f} |")
    return "\n".join(rows)

