"""One process (`local`), or replicas on every rank with the batch split across ranks (`ddp`).

Under `ddp` every rank holds whole parameters and applies the same update (same seeds, same
all-reduced losses), so replicas stay identical with no parameter traffic at all: a step costs an
all-reduce of a few scalars. Parameter sums (ConMeZO's norm) need no reduction: each rank has them.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from zoscale.comm import Comm
from zoscale.config import ConfigError
from zoscale.models import build_model
from zoscale.shards import local_shards

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


def _device() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class LocalBackend:
    name = "local"

    def setup(self, timeout_s: float) -> tuple[Comm, torch.device]:
        check_launch_environment(self.name)
        self.comm = Comm()
        return self.comm, _device()

    def build(self, cfg, vocab_size: int, device):
        """The model, built (or loaded) and distributed as this backend wants it."""
        init_device = device if cfg.init_device == "device" else "cpu"
        return self.prepare(build_model(cfg, vocab_size=vocab_size, init_device=init_device).to(device), device)

    def prepare(self, model, device):
        """Wrap or shard the model (after it is on its device)."""
        return model

    def shards(self, model, master_dtype):
        return local_shards(model, master_dtype=master_dtype), Comm(distributed=False)

    body = None  # losses call the base model directly (no full-vocabulary logits) ...
    head = None  # ... and the output embedding on the scored positions only

    def teardown(self) -> None:
        pass


class DDPBackend(LocalBackend):
    name = "ddp"
    needs_process_group = False  # sharded backends need one even for a single process

    def setup(self, timeout_s: float) -> tuple[Comm, torch.device]:
        check_launch_environment(self.name)
        world = launched_world_size()
        alone = world == 1 and "RANK" not in os.environ
        if alone and self.needs_process_group:  # no launcher: a world of one, in this process only
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        device = _device()
        if not dist.is_initialized() and "RANK" in os.environ:
            backend = "nccl" if device.type == "cuda" else "gloo"
            # alone, the rendezvous store lives in this process: nothing listens on a network port
            store = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if alone else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **store,
                                    **({"device_id": device} if device.type == "cuda" else {}))
        self.comm = Comm()
        return self.comm, device

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
