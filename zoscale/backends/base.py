"""What a backend is, and the process group the replicated and sharded backends share.

A backend turns the launcher's environment into ``(comm, device)`` and a model into
``(shards, shard_comm)``, with the model's body and head (``split``); the trainer sees nothing
else of it. Backends compose the functions here rather than inherit from one another.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from zoscale.engine import Comm, Shard
from zoscale.errors import ConfigError
from zoscale.models import BodyHead, build_model, snapshot


class Backend(Protocol):
    name: str
    split: BodyHead  # the model's body and head, as the losses call them
    sharded: bool  # a forward gathers parameters: every rank must run as many forwards as the others

    def setup(self, timeout_s: float) -> tuple[Comm, torch.device]:
        """The process group (if any) and this rank's device."""

    def build(self, cfg, vocab_size: int, device: torch.device) -> torch.nn.Module:
        """The model, built (or loaded) and distributed as this backend wants it."""

    def prepare(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Wrap or shard a model that is on its device."""

    def shards(self, model: torch.nn.Module, master_dtype: torch.dtype | None) -> tuple[list[Shard], Comm]:
        """This rank's pieces of the trainable parameters, and the Comm that sums over elements."""

    def named_groups(self) -> dict[tuple[int, ...], str]:
        """This rank's process groups other than the world, by their ranks ("shard", "replica")."""

    def teardown(self) -> None:
        """Leave the process group."""


LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int:
    return _int_variable("WORLD_SIZE", 1, minimum=1)


def _int_variable(name: str, default: int, minimum: int = 0, below: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"launcher: {name}={text!r} is not an integer") from None
    if value < minimum or (below is not None and value >= below):
        bounds = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        raise ConfigError(f"launcher: {name}={value} must be {bounds}")
    return value


def check_launch_environment(backend: str) -> None:
    """The launcher's variables, checked before anything starts: a wrong RANK would otherwise wait
    in the first collective until its timeout."""
    world = launched_world_size()
    _int_variable("RANK", 0, below=world)
    _int_variable("LOCAL_RANK", 0, below=_int_variable("LOCAL_WORLD_SIZE", world, minimum=1))
    _int_variable("MASTER_PORT", 0, minimum=1, below=65536)
    if os.environ.get("MASTER_ADDR") == "":
        raise ConfigError("launcher: MASTER_ADDR is empty")
    if world > 1:
        if backend == "local":
            raise ConfigError("backend: 'local' runs one process, but the launcher started several; use backend=ddp")
        missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
        if missing:
            raise ConfigError(f"backend {backend}: WORLD_SIZE={world} but {', '.join(missing)} not set; "
                              f"launch with torchrun or the deepspeed launcher")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_device() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(backend: str, timeout_s: float, alone_too: bool) -> tuple[Comm, torch.device]:
    """The default process group over the launcher's ranks (gloo on CPUs, NCCL on GPUs), and this
    rank's device. ``alone_too``: a process started without a launcher forms a world of one (the
    sharded backends need a group even then), its rendezvous store in this process, so nothing
    listens on a network port for it."""
    check_launch_environment(backend)
    world = launched_world_size()
    alone = world == 1 and "RANK" not in os.environ
    if alone and alone_too:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    device = local_device()
    if not dist.is_initialized() and "RANK" in os.environ:
        store = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if alone else {}
        group_backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(group_backend, timeout=datetime.timedelta(seconds=timeout_s), **store,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Comm(), device


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def build_whole(cfg, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """The whole model on ``device``: loaded, or built from its config (drawn on the CPU unless
    ``model.init_device: device``)."""
    init_device = device if cfg.init_device == "device" else "cpu"
    return build_model(cfg, vocab_size=vocab_size, init_device=init_device).to(device)


def node_snapshot(name: str) -> Path:
    """A local directory, or a hub id's snapshot, downloaded into the Hugging Face cache by the
    first rank of each node while the others wait (files, never a model in memory)."""
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    path = snapshot(name) if first else None
    Comm().barrier()
    return path or snapshot(name, download=False)


def shard_layout(shard_size: int | str | None, key: str) -> tuple[int, int]:
    """(replica groups, ranks per shard group) of this world for a shard size (None: the whole
    world; "auto": the ranks of one node, as torchrun or the deepspeed launcher says). ``key`` names
    the config key in the error."""
    world = Comm().world_size
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world
    size = int(local) if shard_size == "auto" else shard_size
    size = world if size is None else size
    if world % size:
        raise ConfigError(f"{key}: {size} ranks per shard group do not divide the {world} ranks")
    return world // size, size


def shard_mesh(device: torch.device, replicas: int, size: int):
    """A device mesh of consecutive shard groups (replicas x shard), or one dimension when the
    world is one shard group."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicas == 1:
        return init_device_mesh(device.type, (size,))
    return init_device_mesh(device.type, (replicas, size), mesh_dim_names=("replica", "shard"))


def mesh_groups(mesh) -> dict[tuple[int, ...], str]:
    """This rank's shard and replica groups by their ranks (the communication ledger's names)."""
    if mesh is None or mesh.ndim == 1:
        return {}
    return {tuple(dist.get_process_group_ranks(mesh.get_group(dim))): dim for dim in ("shard", "replica")}


def load_pieces(model, files: list[Path], fill) -> None:
    """``fill(parameter, piece)`` for every parameter of ``model`` in the safetensors ``files``
    (``piece``: the file's lazy slice, so a rank reads only what it copies). Checkpoint keys may lack
    the base-model prefix (OPT's are 'decoder.layers...'); a parameter missing from them is an error."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "model") + "."
    loaded = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name = key if key in params else prefix + key
                if name in params:
                    with torch.no_grad():
                        fill(params[name], handle.get_slice(key))
                    loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"the checkpoint has no weights for {missing[:3]}{'...' if len(missing) > 3 else ''}")
