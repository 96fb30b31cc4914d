"""DeepSpeed ZeRO-3: each rank holds a flat partition of every parameter (`param.ds_tensor`).

`deepspeed.initialize` partitions the model with no optimizer (ZO needs none). Partition r of a
parameter holds its flattened elements [r * P, (r + 1) * P) with P = ceil(numel / world); the last
rank's partition is padded, and the padding is cut off the shard. Decoder layers are ZeRO-3 leaf
modules: a layer's parameters are gathered in one collective. The head gathers its parameters
with `GatheredParameters`, on every rank.

Parameters at or below the persistence threshold (`replicate_small_params`, or the JSON's
`stage3_param_persistence_threshold`) are kept whole on every rank of the partition group: the
shard is the whole parameter, gathered once at start-up, and DeepSpeed's two copies follow it
without a collective. Its partition becomes a view of the whole, and its gathered copy is the
whole, marked available and external (DeepSpeed's flag for a parameter that the module which
fetched it must not release). DeepSpeed's own persistence cannot serve alone: it keeps a
parameter gathered only once its trace of the forward is complete, which zoscale's forwards, run
below the root module, never make it, so it would gather the parameter in every forward.
Should anything release it anyway (a `GatheredParameters` outside zoscale), the next gather reads
the partition, which is the whole's own elements, and a forward pre-hook points it at the whole.

Hybrid (`zero3_shard_size: S`): an `mpu` whose data-parallel group is this rank's shard group of S
consecutive ranks is handed to `deepspeed.initialize`, and models built in place are built under
`zero.Init(data_parallel_group=...)`; DeepSpeed then partitions and gathers within the group, and
the groups hold replicas. Pretrained weights are read partition by partition (`_load_partitions`):
transformers' ZeRO-3 loading fills parameters from global rank 0 alone, which is in one group only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

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
from zoscale.engine import Shard, decays, offload_compute_device
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


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("backend deepspeed: needs deepspeed (pip install deepspeed)") from None
    return deepspeed


def offload_device(config_path: str | None) -> str | None:
    """Where a DeepSpeed JSON offloads parameters: None, "cpu" or "nvme"."""
    if config_path is None:
        return None
    with open(config_path) as f:
        return json.load(f).get("zero_optimization", {}).get("offload_param", {}).get("device")


def zero3_config(dtype: torch.dtype, persistence_threshold: int = 0) -> dict:
    """The DeepSpeed config zoscale generates (configs/deepspeed/zero3.json, resolved)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence_threshold},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


def resolve_auto(config: dict, dtype: torch.dtype) -> dict:
    """A config written for the Trainer ("auto" values, which transformers fills from
    TrainingArguments) as zoscale's own deepspeed.initialize takes it: one micro-batch, bf16 and
    fp16 by the model's dtype, and DeepSpeed's defaults for any other "auto"."""
    def fill(node: dict, section: str) -> dict:
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                out[key] = fill(value, key)
            elif value != "auto":
                out[key] = value
            elif key == "train_micro_batch_size_per_gpu":
                out[key] = 1
            elif key == "enabled" and section in ("bf16", "fp16"):
                out[key] = dtype == (torch.bfloat16 if section == "bf16" else torch.float16)
        return out
    return fill(config, "")


class DeepSpeedBackend:
    name = "deepspeed"
    sharded = True

    def __init__(self, config_path: str | None = None, shard_size: int | str | None = None,
                 replicate_small_params: int = 0):
        """shard_size: ranks per partition group, replicas across groups (None: the whole world;
        "auto": one node's ranks). replicate_small_params: the persistence threshold of the config
        zoscale generates (a JSON sets its own)."""
        self.config_path, self.shard_size = config_path, shard_size
        self.replicate_small_params = replicate_small_params
        self.wholes: dict[torch.nn.Parameter, torch.Tensor] = {}  # parameters kept whole -> their values
        self.split = BodyHead(head_fn=_gathered_head)
        self.mesh = None  # replicas x shard, when the world holds several shard groups

    def setup(self, timeout_s: float):
        deepspeed = _deepspeed()
        if offload_device(self.config_path) == "nvme":
            from deepspeed.ops.op_builder import AsyncIOBuilder

            if not AsyncIOBuilder().is_compatible(verbose=False):
                raise ConfigError("deepspeed_config: offload_param nvme needs DeepSpeed's async_io op, which needs "
                                  "libaio (apt install libaio-dev)")
        if not torch.cuda.is_available():
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 45 s JIT build on CPU
        comm, device = init_distributed(self.name, timeout_s, alone_too=True)  # the group DeepSpeed then uses
        replicas, size = shard_layout(self.shard_size, "zero3_shard_size")
        if replicas > 1:
            if offload_device(self.config_path) == "nvme":
                raise ConfigError("zero3_shard_size: not with offload_param nvme (not built)")
            self.mesh = shard_mesh(device, replicas, size)
        return comm, device

    @property
    def shard_group(self):
        return None if self.mesh is None else self.mesh.get_group("shard")

    def build(self, cfg, vocab_size: int, device):
        """Pretrained weights load straight into partitions: with an HfDeepSpeedConfig alive,
        transformers builds under zero.Init, so no rank holds the whole model. The same goes for a
        config's random weights with `model.init_device: device` (drawn partitioned: the same
        values on any number of ranks, but not the CPU's). Otherwise the model is built whole and
        then partitioned."""
        if cfg.lora is not None or (cfg.name_or_path is None and cfg.init_device != "device"):
            return self.prepare(build_whole(cfg, vocab_size, device), device)
        dtype = getattr(torch, cfg.dtype)
        if self.mesh is not None:
            return self.prepare(self._build_in_groups(cfg, vocab_size, dtype), device)
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_config = HfDeepSpeedConfig(self._config(dtype))  # must stay alive while building
        if cfg.name_or_path is not None:
            model = auto_class(cfg).from_pretrained(cfg.name_or_path, dtype=dtype)
        else:
            torch.manual_seed(cfg.init_seed)
            model = auto_class(cfg).from_config(transformers_config(cfg, vocab_size), dtype=dtype)
        model.eval().requires_grad_(False)
        select_trainable(model, cfg.trainable)
        print0(f"built {cfg.name_or_path or 'random weights'} in ZeRO-3 partitions (no rank holds the whole model)")
        return self.prepare(model, device)

    def _build_in_groups(self, cfg, vocab_size: int, dtype: torch.dtype):
        """Built under zero.Init over this rank's shard group, then (pretrained) each rank reads its
        partitions' elements from the safetensors files."""
        from transformers import AutoConfig
        from transformers.integrations import HfDeepSpeedConfig

        path = node_snapshot(cfg.name_or_path) if cfg.name_or_path is not None else None
        config = AutoConfig.from_pretrained(path) if path is not None else transformers_config(cfg, vocab_size)
        with torch.device("meta"):  # imports the model's module: transformers' lazy import fails under zero.Init
            auto_class(cfg).from_config(config)
        torch.manual_seed(cfg.init_seed)
        # transformers initialises the weights through GatheredParameters while this is alive; the
        # outer zero.Init (the outermost one partitions) sets the group
        self._hf_config = HfDeepSpeedConfig(self._config(dtype))
        with _deepspeed().zero.Init(data_parallel_group=self.shard_group, config_dict_or_path=self._config(dtype)):
            model = auto_class(cfg).from_config(config, dtype=dtype)
        if path is not None:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"model.name_or_path: {path} holds no *.safetensors (zero3_shard_size reads them "
                                  f"partition by partition)")
            _load_partitions(model, files, Comm(group=self.shard_group).rank)
        model.eval().requires_grad_(False)
        select_trainable(model, cfg.trainable)
        print0(f"built {cfg.name_or_path or 'random weights'} in ZeRO-3 partitions of each shard group")
        return model

    def _config(self, dtype: torch.dtype) -> dict:
        if self.config_path is None:
            return zero3_config(dtype, self.replicate_small_params)
        with open(self.config_path) as f:  # validated by zoscale.config
            return resolve_auto(json.load(f), dtype)

    def prepare(self, model, device):
        """Each decoder layer (the model's `_no_split_modules` classes) a ZeRO-3 leaf: its
        parameters are gathered together when it starts, one collective per layer and forward,
        instead of one per parameter as its submodules start."""
        dtype = next(model.parameters()).dtype
        layers = {type(m) for m in decoder_layers(model)}
        if layers:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, sorted(layers, key=lambda c: c.__name__))
        mpu = None if self.mesh is None else _ShardGroupMPU(self.shard_group)
        engine, *_ = _deepspeed().initialize(model=model, config=self._config(dtype), mpu=mpu)
        return engine.module

    def shards(self, model, master_dtype):
        if master_dtype is not None:
            raise ConfigError("model.master_weights: not with backend deepspeed")
        shard_comm = Comm(group=self.shard_group)
        rank, shards, swapped = shard_comm.rank, [], {}
        self._keep_whole(model, rank)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p in self.wholes:
                whole = self.wholes[p]
                shards.append(Shard(name, whole, global_numel=p.ds_numel, weight_decay=decays(name, p.ds_shape),
                                    compute_device=offload_compute_device(whole), primary=rank == 0))
                continue
            partition = p.ds_tensor.ds_numel
            offset = rank * partition
            valid = max(0, min(partition, p.ds_numel - offset))
            on_nvme = getattr(p, "nvme_swapper", None) is not None and p.nvme_swapper.swappable_tensor(param=p)
            if on_nvme:  # a placeholder until NVMeStorage reads the partition in
                local = torch.empty(valid, dtype=p.dtype, device="meta")
            else:
                local = p.ds_tensor.data.narrow(0, 0, valid)
            shard = Shard(name, local, offset=min(offset, p.ds_numel), global_numel=p.ds_numel,
                          weight_decay=decays(name, p.ds_shape), compute_device=offload_compute_device(local))
            if on_nvme:
                swapped[shard.name] = p
            shards.append(shard)
        if swapped:
            storage = NVMeStorage(swapped)
            for shard in shards:
                shard.storage = storage if shard.name in swapped else None
        return shards, shard_comm

    def _keep_whole(self, model, rank: int) -> None:
        """The trainable parameters DeepSpeed persists, each as one whole tensor per rank (gathered
        once, here): its partition becomes a view of it and its gathered copy is it, marked
        available and external so that DeepSpeed neither gathers nor releases it; a forward pre-hook
        on the module that owns it re-points a copy gathered again after something released it."""
        kept = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad and getattr(p, "ds_persist", False)
                and p not in self.wholes]
        if not kept:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        with _deepspeed().zero.GatheredParameters(kept):
            for p in kept:
                partition = p.ds_tensor.ds_numel
                padded = torch.zeros(partition * dist.get_world_size(self.shard_group), dtype=p.dtype,
                                     device=p.ds_tensor.device)
                padded[: p.ds_numel].copy_(p.data.reshape(-1))
                self.wholes[p] = padded[: p.ds_numel].view(p.ds_shape)
                p.ds_tensor.data = padded.narrow(0, rank * partition, partition)
        for p in kept:
            p.data, p.ds_status, p.is_external_param = self.wholes[p], ZeroParamStatus.AVAILABLE, True
        for module in model.modules():
            owned = [p for p in module._parameters.values() if p in self.wholes]
            if owned:
                module.register_forward_pre_hook(lambda _module, _args, owned=owned: self._point_at_wholes(owned))

    def _point_at_wholes(self, params) -> None:
        for p in params:
            p.data = self.wholes[p]

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """Gathered a module at a time, copied to the host on rank 0."""
        state = {}
        for prefix, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if p not in self.wholes]
            with _deepspeed().zero.GatheredParameters(params):
                if Comm().is_main:
                    buffers = [(n, b) for n, b in module.named_buffers(recurse=False)
                               if n not in module._non_persistent_buffers_set]
                    for name, t in [*module.named_parameters(recurse=False), *buffers]:
                        t = self.wholes.get(t, t) if isinstance(t, torch.nn.Parameter) else t
                        state[f"{prefix}.{name}" if prefix else name] = t.detach().cpu().clone()
        return state

    def named_groups(self) -> dict:
        return mesh_groups(self.mesh)

    def teardown(self) -> None:
        destroy_distributed()


class _ShardGroupMPU:
    """DeepSpeed's `mpu` protocol with the shard group as its data-parallel group: ZeRO-3 then
    partitions and gathers within it. No model parallelism."""

    def __init__(self, group):
        self.group = group

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.group)

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self):
        return None


def _load_partitions(model, files: list[Path], rank: int) -> None:
    """Each parameter's partition for ``rank`` (of its partition group) from safetensors files: the
    rows that hold its flat range are read and cut to it."""
    def fill(p, piece):
        lo = rank * p.ds_tensor.ds_numel
        hi = min(p.ds_numel, lo + p.ds_tensor.ds_numel)
        if lo < hi:
            row = math.prod(piece.get_shape()[1:])
            first = lo // row
            values = piece[first : -(-hi // row)].reshape(-1)[lo - first * row : hi - first * row]
            p.ds_tensor.data[: hi - lo].copy_(values.to(p.ds_tensor.dtype))

    load_pieces(model, files, fill)


def _gathered_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output embedding with its parameters gathered and copied (a collective), so that
    autograd through the head (PseuZO) outlives the release of the gathered weights."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    head = causal_lm(model).get_output_embeddings()
    # a parameter kept whole is available already, and must not be released after
    params = [p for p in (head.weight, head.bias) if p is not None and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    with _deepspeed().zero.GatheredParameters(params):
        weight = head.weight.detach().clone()
        bias = None if head.bias is None else head.bias.detach().clone()
    return linear_head(head, hidden, weight, bias)


class NVMeStorage:
    """ZeRO-3 partitions offloaded to NVMe (`offload_param: nvme`). Between uses a partition is on
    the drive and `ds_tensor` is an empty placeholder; DeepSpeed reads it into one of a few shared
    buffers for each forward and drops it after, unchanged. The engine's passes read a few
    partitions in with the same swapper, write them in place, and write them back before release."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params  # shard name -> parameter
        self.swapper = next(iter(params.values())).nvme_swapper
        self.capacity = max(1, self.swapper.param_buffer_count)

    def load(self, shards) -> None:
        from deepspeed.runtime.swap_tensor.partitioned_param_swapper import (
            PartitionedParamStatus,
        )

        params = [self.params[s.name] for s in shards]
        if any(p.ds_tensor.status != PartitionedParamStatus.NOT_AVAILABLE for p in params):
            raise RuntimeError("an NVMe-offloaded partition is in use by DeepSpeed outside a forward")
        self.swapper.swap_in(params, async_op=False)
        for shard, p in zip(shards, params):
            shard.tensor = p.ds_tensor.data.narrow(0, 0, shard.numel)

    def store(self, shards) -> None:
        params = [self.params[s.name] for s in shards]
        self.swapper.swap_out_and_release(params)
        for shard in shards:
            shard.tensor = torch.empty(shard.numel, dtype=shard.tensor.dtype, device="meta")
