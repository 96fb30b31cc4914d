"""FSDP2 (`fully_shard`): each rank holds a block of rows of every parameter.

Every decoder layer (the model's `_no_split_modules` classes) is one FSDP unit and the root owns
the rest (embeddings, final norm, LM head), so tied weights stay one parameter: sharding the base
model as a unit of its own silently unties OPT's embedding and head. The root reshards after every
forward, otherwise edits to its shards would not reach the next forward.

Shards are the local blocks (`DTensor.to_local()`, rows along dim 0, the last rank may hold fewer)
with their global offsets; sums over parameter elements reduce over the shard group. The body runs
through the root forward (so every unit's hooks fire); the head is applied with its weight
gathered (`full_tensor`), outside FSDP's unshard/reshard cycle. Parameters of at most
`replicate_small_params` elements are left out of FSDP2 (`ignored_params`): every rank holds them
whole and the forward reads them as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from zoscale.backends.base import (
    build_whole,
    destroy_distributed,
    init_distributed,
    load_pieces,
    mesh_groups,
    node_snapshot,
    shard_layout,
    shard_mesh,
)
from zoscale.engine import (
    PerturbationEngine,
    Shard,
    decays,
    offload_compute_device,
    rng,
)
from zoscale.engine.comm import Comm, print0
from zoscale.errors import ConfigError
from zoscale.models import (
    BodyHead,
    auto_class,
    causal_lm,
    decoder_layers,
    linear_head,
    select_trainable,
    transformers_config,
)

_INIT_STREAM = 0x1A17  # mixed into the init seed, so the weights never share a seed with a step


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's block of rows of a sharded parameter (the same storage, detached: ZO writes it in
    place without autograd's view tracking) and the parameter's first row in it; all of a parameter
    kept whole."""
    if not isinstance(p, DTensor):
        return p.detach(), 0
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local().detach(), offset[0]


def _load_rows(model, files: list[Path]) -> None:
    """Copy each parameter's local rows from safetensors files (only these rows are read)."""
    def fill(p, piece):
        local, first = _local_rows(p)
        local.copy_(piece[first : first + local.shape[0]].to(local.dtype))

    load_pieces(model, files, fill)


def _draw_rows(model, seed: int) -> None:
    """Random weights for a model built from a config, each rank drawing only its rows: element i
    of parameter p is a pure function of (seed, p's name, i), like a perturbation, so the weights
    are the same on any number of ranks. Biases are zeros, norm weights ones, every other weight
    N(0, std^2) with the config's initializer_range (OPT: init_std): transformers' layout, without
    its zeroed padding-token row."""
    config = model.config
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02)
    normal, seen = [], set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied: drawn once, under its first name
                continue
            seen.add(id(p))
            local, first = _local_rows(p)
            with torch.no_grad():
                local.fill_(1.0 if is_norm and leaf == "weight" else 0.0)
            if leaf != "bias" and not is_norm:
                normal.append((p, local, first))
    names = {id(p): name for name, p in model.named_parameters()}
    shards = [Shard(names[id(p)], local, offset=first * (p.numel() // p.shape[0]), global_numel=p.numel(),
                    compute_device=offload_compute_device(local)) for p, local, first in normal]
    tensors = [s.tensor for s in shards]
    PerturbationEngine(shards).apply(shards, tensors, tensors, 0.0, {rng.mix_seed(seed, _INIT_STREAM): std})


class FSDPBackend:
    name = "fsdp"
    sharded = True

    def __init__(self, compute_dtype: str | None = None, cpu_offload: bool = False,
                 shard_size: int | str | None = None, replicate_small_params: int = 0):
        """compute_dtype: FSDP2's MixedPrecisionPolicy (e.g. fp32 shards, which the perturbations
        go into, with bf16 compute); cpu_offload: shards in host memory; shard_size: ranks per
        shard group, replicas across groups (None: the whole world; "auto": one node's ranks);
        replicate_small_params: parameters of at most this many elements stay whole on every rank."""
        self.compute_dtype, self.cpu_offload, self.shard_size = compute_dtype, cpu_offload, shard_size
        self.replicate_small_params = replicate_small_params
        self.split = BodyHead(_root_body, _gathered_head)
        self.mesh = None

    def setup(self, timeout_s: float):
        if self.cpu_offload and not torch.cuda.is_available():
            raise ConfigError("fsdp_cpu_offload: needs CUDA devices (the shards are on the host already)")
        comm, device = init_distributed(self.name, timeout_s, alone_too=True)
        self.layout()  # a shard size that does not divide the world, refused before anything is built
        return comm, device

    def build(self, cfg, vocab_size: int, device):
        """Pretrained weights (a local directory, or a hub id's snapshot), and a config's random
        weights with `model.init_device: device`, go into a model built on the meta device and
        sharded: each rank reads only its rows from the safetensors files, or draws only its rows
        (`_draw_rows`). No rank ever holds the whole model. Anything else is built whole, on the
        CPU, and then sharded."""
        path = node_snapshot(cfg.name_or_path) if cfg.name_or_path and cfg.lora is None else None
        if path is not None and list(path.glob("*.safetensors")):
            from transformers import AutoConfig, AutoModelForCausalLM

            model = self._empty(AutoModelForCausalLM, AutoConfig.from_pretrained(path), cfg, device)
            _load_rows(model, sorted(path.glob("*.safetensors")))
            print0(f"loaded each rank's rows of {path} (sharded loading: no rank holds the whole model)")
            return model
        if cfg.name_or_path is None and cfg.lora is None and cfg.init_device == "device":
            model = self._empty(auto_class(cfg), transformers_config(cfg, vocab_size), cfg, device)
            _draw_rows(model, cfg.init_seed)
            print0("drew random weights in FSDP2 shards (no rank holds the whole model)")
            return model
        return self.prepare(build_whole(cfg, vocab_size, device), device)

    def _empty(self, auto, config, cfg, device):
        """The model sharded with its parameters allocated but not filled (buffers such as rotary
        tables are computed as usual)."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
            model = auto.from_config(config, dtype=getattr(torch, cfg.dtype))
        model.tie_weights()  # init_empty_weights re-creates each parameter it moves to meta, which unties them
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.eval().requires_grad_(False)
        select_trainable(model, cfg.trainable)
        model = self.prepare(model, device)
        model.to_empty(device=device)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])  # to_empty() left them uninitialised
        return model

    def layout(self) -> tuple[int, int]:
        return shard_layout(self.shard_size, "fsdp_shard_size")

    def prepare(self, model, device):
        """Every decoder layer an FSDP2 unit, the root the rest. On a 2-D mesh (replicas x shard
        group, the ranks of a shard group consecutive) FSDP2 gathers within the shard group only:
        replicas exchange no parameter."""
        self.mesh = mesh = shard_mesh(device, *self.layout())
        if not getattr(model, "_no_split_modules", None):
            raise ConfigError("backend fsdp: the model names no _no_split_modules to shard layer by layer")
        options = {"mesh": mesh}
        if self.replicate_small_params:
            options["ignored_params"] = {p for p in model.parameters() if p.numel() <= self.replicate_small_params}
        if self.compute_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, self.compute_dtype))
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for module in decoder_layers(model):
            fully_shard(module, **options)
        fully_shard(model, reshard_after_forward=True, **options)
        return model

    def shards(self, model, master_dtype):
        if master_dtype is not None:
            raise ConfigError("model.master_weights: not with backend fsdp (keep fp32 shards and compute in half "
                              "precision instead)")
        mesh = next(p.device_mesh for p in model.parameters() if isinstance(p, DTensor))
        shard_comm = Comm() if mesh.ndim == 1 else Comm(group=mesh.get_group("shard"))
        shards = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            local, first = _local_rows(p)
            row = p.numel() // p.shape[0] if p.shape[0] else 0
            shards.append(Shard(name, local, offset=first * row, global_numel=p.numel(),
                                weight_decay=decays(name, p.shape), compute_device=offload_compute_device(local),
                                primary=isinstance(p, DTensor) or shard_comm.rank == 0))
        return shards, shard_comm

    def named_groups(self) -> dict[tuple[int, ...], str]:
        return mesh_groups(self.mesh)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The whole model's tensors on rank 0 (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def teardown(self) -> None:
        destroy_distributed()


def _root_body(model, input_ids, attention_mask) -> torch.Tensor:
    """The head's input, from the root forward: called directly, the base model would skip the
    root's pre-forward and the layers would keep serving their first all-gathered values."""
    captured = []
    head = causal_lm(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured[0]


def _gathered_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output embedding with its weight gathered into a tensor of its own (a collective),
    so that autograd through the head (PseuZO) outlives the root's resharding. Under CPU offload
    the shards move to the compute device first (NCCL gathers device tensors only)."""
    head = causal_lm(model).get_output_embeddings()

    def gather(t: torch.Tensor) -> torch.Tensor:
        t = t.to(hidden.device)
        return (t.full_tensor() if isinstance(t, DTensor) else t).to(hidden.dtype)

    weight = gather(head.weight)
    bias = None if head.bias is None else gather(head.bias)
    return linear_head(head, hidden, weight, bias)
