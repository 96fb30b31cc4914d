"""`zoscale plan --nodes N --gpus-per-node G ...`: the layouts of a ZO run on a cluster, with memory
per GPU, bytes per step on each link and a predicted step time, the fastest marked.

A layout is a shard size S (FSDP2 ranks per shard group; replicas across groups): S = 1 holds whole
replicas, S = G one node's GPUs (hybrid), S = N x G the whole world (flat); "offload" keeps the flat
shards in host memory. Each rank forwards its share of the batch (B x L / (N x G) tokens) with
every layer gathered within its group, and the step's losses are all-reduced over the world.

The model of a step, per GPU (MeZO: two forwards and three passes over the shard; with
`dual_forward` one forward of twice the tokens, each layer gathered once, one pass over the shard
and z drawn twice for the whole gathered model):

    forward  = max(FLOPs / FLOP rate, gather bytes / link bandwidth) + layers x per-layer overhead
    passes   = bytes read and written / pass bandwidth          (offload: host bytes / offload rate)

Gathers overlap compute (FSDP2 prefetches the next layer). A gather within a node moves
(S-1)/S of the model over NVLink; one that spans nodes moves (S-G)/S of it over the network and the
rest over NVLink, both at once. The constants come from one H100 (the table below says where each
was measured); the bandwidths are the user's. A prediction, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoscale.errors import ConfigError


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    where: str


H100 = "one H100 80GB HBM3, 2026-11-23, profiling/reports/h100-2026-11-23/speed"
CONSTANTS = {
    "flop_rate": Constant(5.8e14, "FLOP/s", f"OPT-13B forward, bf16, batch 16 x 128: 90.58 ms for 2 x 12.85e9 x 2048 "
                                            f"FLOP (OPT-30B: 6.2e14) ({H100})"),
    "pass_bandwidth": Constant(1.525e12, "B/s (read + written)", f"a Gaussian perturbation pass over OPT-13B bf16: "
                                                                 f"33.71 ms for 2 x 25.7 GB ({H100})"),
    "layer_overhead_s": Constant(0.91e-3, "s per layer and forward",
                                 f"FSDP2 at world size 1, OPT-1.3B: 42.02 ms against 20.17 ms unsharded, 24 layers "
                                 f"({H100})"),
    "offload_rate": Constant(6.2e9, "B/s", f"ZeRO-3 offload_param cpu, OPT-1.3B: a forward of 442.91 ms against "
                                           f"20.17 ms on the GPU, 2.63 GB brought in ({H100})"),
}
LOSS_BYTES = 40  # the step's losses and the stop flag, float64 sums (the ledger's count on the quickstart)


@dataclass
class Layout:
    name: str
    shard_size: int
    dual: bool
    memory_gib: float
    intra_bytes: float  # per GPU and step: received over the node's links
    inter_bytes: float  # over the network between nodes
    host_bytes: float  # between host memory and the GPU (offload)
    step_s: float
    fits: bool
    forward_s: float = 0.0
    fastest: bool = False


def layouts(model: str, nodes: int, gpus_per_node: int, gpu_memory_gib: float, intra_gbps: float,
            inter_gbps: float, batch: int = 16, seq: int = 128, dtype: str = "bfloat16",
            optimizer: str = "mezo") -> list[Layout]:
    world = nodes * gpus_per_node
    if batch < world:
        raise ConfigError(f"--batch: {batch} sequences do not give each of the {world} GPUs one")
    sizes = sorted({1, *(s for s in range(2, world + 1)
                         if world % s == 0 and (s <= gpus_per_node or s % gpus_per_node == 0))})
    out = []
    for size in sizes:
        for offload in (False, True) if size == world and world > 1 else (False,):
            for dual in (False, True) if size > 1 else (False,):
                out.append(predict(model, size, nodes, gpus_per_node, intra_gbps, inter_gbps, batch, seq, dtype,
                                   optimizer, dual=dual, offload=offload, gpu_memory_gib=gpu_memory_gib))
    fitting = [lay for lay in out if lay.fits]
    if fitting:
        min(fitting, key=lambda lay: lay.step_s).fastest = True
    return out


def predict(model: str, size: int, nodes: int, gpus_per_node: int, intra_gbps: float, inter_gbps: float,
            batch: int, seq: int, dtype: str = "bfloat16", optimizer: str = "mezo", dual: bool = False,
            offload: bool = False, sharded: bool | None = None, gpu_memory_gib: float = float("inf")) -> Layout:
    """One layout: shard groups of ``size`` GPUs (``sharded``: under FSDP2, even of one GPU; by
    default when size > 1)."""
    from zoscale.cli.plan import plan

    world = nodes * gpus_per_node
    sharded = size > 1 if sharded is None else sharded
    intra, inter = intra_gbps * 1e9 / 8, inter_gbps * 1e9 / 8  # B/s per GPU and direction
    c = {k: v.value for k, v in CONSTANTS.items()}
    est = plan(model, "fsdp" if sharded else "ddp", size, batch, seq, dtype, optimizer, world=world)
    model_bytes = est.parameters * est.bytes_per_parameter
    shard_bytes = model_bytes / size
    flops = 2 * est.parameters * batch * seq / world
    forwards = 1 if dual else 2
    spans = size > gpus_per_node
    inner = (min(size, gpus_per_node) - 1) / size * model_bytes
    outer = (size - gpus_per_node) / size * model_bytes if spans else 0.0
    gather_s = max(inner / intra, outer / inter)
    overhead = est.layers * c["layer_overhead_s"] if sharded else 0.0
    forward_s = max(flops * (2 if dual else 1) / c["flop_rate"], gather_s) + overhead
    # passes: 3 over the shard, or 1 with dual_forward plus z drawn for the whole gathered model, both sides
    shard_pass_bytes = 2 * shard_bytes * (1 if dual else 3)
    whole_bytes = 2 * 2 * model_bytes if dual else 0.0
    host = 0.0
    if offload:  # the shard comes in for each forward; the passes stage it through the GPU
        host = forwards * shard_bytes + shard_pass_bytes
        passes_s = host / c["offload_rate"] + whole_bytes / c["pass_bandwidth"]
    else:
        passes_s = (shard_pass_bytes + whole_bytes) / c["pass_bandwidth"]
    memory = est.total_gib - (est.parameter_shard_gib + est.optimizer_buffers_gib if offload else 0.0)
    if dual:  # activations for twice the tokens, and a copy of a layer's parameters
        memory += est.activations_gib + est.gathered_layers_gib / 2
    name = "replicas" if size == 1 else "offload" if offload else "flat" if size == world else f"hybrid {size}"
    return Layout(name, size, dual, memory, intra_bytes=forwards * inner,
                  inter_bytes=forwards * outer + (LOSS_BYTES if nodes > 1 else 0), host_bytes=host,
                  step_s=forwards * forward_s + passes_s, fits=memory <= gpu_memory_gib, forward_s=forward_s)


def table(model: str, nodes: int, gpus_per_node: int, plans: list[Layout]) -> str:
    rows = [f"{model} on {nodes} x {gpus_per_node} GPUs",
            "", "| layout | shard size | dual_forward | memory per GPU (GiB) | fits | NVLink per step | "
            "network per step | host link per step | predicted step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for lay in plans:
        mark = " **fastest**" if lay.fastest else ""
        rows.append(f"| {lay.name}{mark} | {lay.shard_size} | {'yes' if lay.dual else 'no'} | {lay.memory_gib:.1f} | "
                    f"{'yes' if lay.fits else 'no'} | {_size(lay.intra_bytes)} | {_size(lay.inter_bytes)} | "
                    f"{_size(lay.host_bytes)} | {lay.step_s * 1e3:.0f} ms |")
    return "\n".join(rows)


def constants_table() -> str:
    rows = ["| constant | value | where it was measured |", "| --- | --- | --- |"]
    rows += [f"| {k} | {v.value:.3g} {v.unit} | {v.where} |" for k, v in CONSTANTS.items()]
    return "\n".join(rows)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
