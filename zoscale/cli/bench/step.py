"""`zoscale bench step`: what a ZO step costs against two forwards, and a perturbation pass
(Gaussian and Rademacher) against the bandwidth floor (an in-place `x.add_(c)` over the same
shards), with the reference MeZO step (the authors' per-parameter `torch.manual_seed` +
`torch.normal`, four passes) measured in the same run. Runs on CPU too (CPU numbers).

The model is built from its config with random weights drawn on the device (ZeRO-3 draws them
partitioned, so models beyond one GPU build too); the batch is random token ids; the loss is the LM
loss over all tokens. Times are medians over `repeats` after one warm-up, with CUDA synchronised.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import zoscale
from zoscale.cli.bench import device_description
from zoscale.engine import PerturbationEngine
from zoscale.engine.ledger import CommLedger
from zoscale.train.memory import GIB


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (kernel compilation, allocator)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reference_mezo_step(model, loss, eps: float, lr: float, seed: int) -> None:
    """The MeZO reference code's step: z regenerated per parameter from a reset global generator."""
    params = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(scale * eps * z)

    perturb(1.0)
    plus = loss()
    perturb(-2.0)
    minus = loss()
    perturb(1.0)
    pg = (plus - minus) / (2 * eps)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
        p.data.add_(-lr * pg * z)


def run(model_config: str, batch: int, seq: int, optimizer: str, backend_name: str, dtype: str,
        repeats: int, out: Path, deepspeed_config: str | None = None, defer_update: bool = False,
        stream: str = "v1", reference: bool = True) -> dict:
    from zoscale import backends
    from zoscale.cli.plan import load_model_config
    from zoscale.config import ModelConfig

    backend = backends.get(backend_name, deepspeed_config)
    comm, device = backend.setup(600.0)
    fields = load_model_config(model_config).to_dict()  # configs/models/opt-13b.json, a directory or a hub id
    cfg = ModelConfig(config=fields, tokenizer="unused", dtype=dtype, init_device="device")
    model = backend.build(cfg, fields["vocab_size"], device)
    shards, shard_comm = backend.shards(model, None)
    options = {"defer_update": True} if defer_update else {}  # MeZO: the update rides on the next step's first pass
    opt = zoscale.build_optimizer(optimizer, shards, comm=comm, shard_comm=shard_comm, lr=1e-7, eps=1e-3,
                                  stream=stream, **options)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fields["vocab_size"], (batch, seq), generator=generator).to(device)

    @torch.no_grad()
    def loss() -> float:
        return model(input_ids=ids, labels=ids).loss.item()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    forward = _timed(loss, repeats)
    ledger = CommLedger(comm.world_size, backend.named_groups())
    with ledger.record(0):  # ConMeZO's first step has no momentum to read yet: the ledger counts the second
        opt.step(loss)
    with ledger.record(1):
        opt.step(loss)
    traffic = opt.engine.traffic
    zo_step = _timed(lambda: opt.step(loss), repeats)
    local_numel = sum(s.tensor.numel() for s in shards)
    # in steady state: a deferred update still pending rides on the next step's first pass
    bytes_per_parameter = (opt.engine.traffic - traffic) / (repeats + 1) / local_numel
    opt.flush()
    seeds = iter(range(10**6, 2 * 10**6))  # a fresh seed each time: one generated stream per pass
    tensors = [s.tensor for s in shards]
    perturb_pass = _timed(lambda: opt.engine.apply(shards, tensors, tensors, 1.0, {next(seeds): 1e-3}), repeats)
    signs = PerturbationEngine(shards, "rademacher", version=stream)
    rademacher_pass = _timed(lambda: signs.apply(shards, tensors, tensors, 1.0, {next(seeds): 1e-3}), repeats)
    in_place = _timed(lambda: [s.tensor.add_(1e-3) for s in shards], repeats)
    local_bytes = sum(s.tensor.numel() * s.tensor.element_size() for s in shards)
    result = {
        "date": datetime.date.today().isoformat(), "device": device_description(device), "world_size": comm.world_size,
        "model": Path(model_config).stem, "backend": backend_name, "deepspeed_config": deepspeed_config,
        "dtype": dtype, "batch": batch, "seq": seq,
        "optimizer": optimizer, "defer_update": defer_update, "stream": stream,
        "parameters": sum(s.global_numel for s in shards), "bytes_per_parameter_per_step": bytes_per_parameter,
        "perturbation_elements_per_s": local_numel / perturb_pass,
        "forward_ms": forward * 1e3, "zo_step_ms": zo_step * 1e3, "zo_step_over_two_forwards": zo_step / (2 * forward),
        "perturbation_pass_ms": perturb_pass * 1e3, "in_place_pass_ms": in_place * 1e3,
        "perturbation_over_in_place": perturb_pass / in_place,
        "rademacher_pass_ms": rademacher_pass * 1e3, "rademacher_over_in_place": rademacher_pass / in_place,
        "in_place_bandwidth_gb_s": 2 * local_bytes / in_place / 1e9,
        "perturbation_bandwidth_gb_s": 2 * local_bytes / perturb_pass / 1e9,
        "comm_per_step": ledger.as_dict()["1"], "comm_summary": ledger.summary(1),
    }
    if reference and backend_name in ("local", "ddp"):  # the reference code knows no shards
        reference = _timed(lambda: reference_mezo_step(model, loss, 1e-3, 1e-7, 7), repeats)
        result.update(reference_mezo_step_ms=reference * 1e3, reference_over_two_forwards=reference / (2 * forward))
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    else:
        import psutil

        result["peak_host_rss_gib"] = psutil.Process().memory_info().rss / GIB
    if comm.is_main:
        out.mkdir(parents=True, exist_ok=True)
        name = report_name(model_config, backend_name, optimizer, deepspeed_config, defer_update, stream)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        (out / f"{name}.md").write_text(markdown(result))
    backend.teardown()
    return result


def report_name(model: str, backend: str, optimizer: str, deepspeed_config: str | None = None,
                defer_update: bool = False, stream: str = "v1") -> str:
    variant = f"-{Path(deepspeed_config).stem}" if deepspeed_config else ""
    return (f"step-{Path(model).stem}-{backend}{variant}-{optimizer}{'-deferred' if defer_update else ''}"
            f"{'' if stream == 'v1' else '-' + stream}")


def markdown(r: dict) -> str:
    rows = [("forward", f"{r['forward_ms']:.2f} ms"),
            (f"{r['optimizer']} step{' (deferred update)' if r.get('defer_update') else ''}",
             f"{r['zo_step_ms']:.2f} ms = {r['zo_step_over_two_forwards']:.2f} x two forwards"),
            ("memory the step's passes read and write", f"{r['bytes_per_parameter_per_step']:.1f} bytes per parameter"),
            (f"perturbation pass (stream {r['stream']})",
             f"{r['perturbation_pass_ms']:.2f} ms = {r['perturbation_over_in_place']:.2f} x in-place "
             f"({r['perturbation_bandwidth_gb_s']:.1f} GB/s, {r['perturbation_elements_per_s'] / 1e6:.0f}M elements/s)"),
            ("Rademacher perturbation pass", f"{r['rademacher_pass_ms']:.2f} ms = "
                                             f"{r['rademacher_over_in_place']:.2f} x in-place"),
            ("in-place pass `x.add_(c)`", f"{r['in_place_pass_ms']:.2f} ms ({r['in_place_bandwidth_gb_s']:.1f} GB/s)")]
    if "comm_summary" in r:
        rows.append(("collectives of a step (rank 0)", r["comm_summary"]))
    if "reference_mezo_step_ms" in r:
        rows.append(("reference MeZO step (4 RNG passes)",
                     f"{r['reference_mezo_step_ms']:.2f} ms = {r['reference_over_two_forwards']:.2f} x two forwards"))
    for key in ("peak_allocated_gib", "peak_host_rss_gib"):
        if key in r:
            rows.append((key.replace("_", " "), f"{r[key]:.2f} GiB"))
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    return (f"# Step benchmark: {r['model']}, {r['backend']}, {r['dtype']}, batch {r['batch']} x {r['seq']}\n\n"
            f"{r['date']}, {r['device']}, world size {r['world_size']}.\n\n| what | time |\n| --- | --- |\n{table}\n")
