"""A ledger of the collectives a process issues: calls and bytes, per process group and kind.

Every collective of torch.distributed (zoscale's own all-reduces, FSDP2's all-gathers, DeepSpeed's)
reaches the dispatcher as a ``c10d`` operator, and DTensor's redistributions (``full_tensor()``) as
``_c10d_functional`` ones, whatever Python function issued it; a dispatch mode
sees each one there with its tensors and its process group, so the ledger counts what runs, not
what a formula predicts. Bytes are the collective's result on this rank (an all-gather's gathered
tensor, an all-reduce's or a broadcast's tensor). Groups are named by the caller (``names``: the
ranks of a group -> "world", "shard", "replica"); others by their ranks.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# c10d operator -> (kind, index of the argument whose tensors are the result on this rank)
_KINDS = {"allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
          "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
          "allgather_into_tensor_coalesced_": ("all_gather", 0), "allgather_coalesced_": ("all_gather", 0),
          "_reduce_scatter_base_": ("reduce_scatter", 0), "reduce_scatter_": ("reduce_scatter", 0),
          "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 0), "broadcast_": ("broadcast", 0),
          "alltoall_": ("all_to_all", 0), "alltoall_base_": ("all_to_all", 0), "gather_": ("gather", 0),
          "scatter_": ("scatter", 0), "reduce_": ("reduce", 0), "barrier": ("barrier", None),
          "send": ("send", 0), "recv_": ("recv", 0)}


# functional collectives (DTensor's redistributions, e.g. full_tensor()): the result is the op's output
_FUNCTIONAL = {"all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
               "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce",
               "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
               "all_to_all_single": "all_to_all", "broadcast": "broadcast"}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CommLedger:
    """``with ledger.record(step):`` counts the collectives issued inside into ``ledger.steps[step]``
    as {group: {kind: {"calls": n, "bytes": b}}}; a step may be recorded in several pieces."""

    def __init__(self, world_size: int, names: dict[tuple[int, ...], str] | None = None):
        """``names``: this rank's other groups by their ranks; the group of every rank is "world"."""
        self.names = {**(names or {}), tuple(range(world_size)): "world"}
        self.steps: dict[int, dict] = {}

    @contextlib.contextmanager
    def record(self, step: int):
        table = self.steps.setdefault(step, defaultdict(lambda: defaultdict(lambda: {"calls": 0, "bytes": 0})))
        with _Observer(lambda group, kind, size: _add(table, self._name(group), kind, size)):
            yield

    def _name(self, group) -> str:
        try:
            ranks = tuple(dist.get_process_group_ranks(group))
        except (RuntimeError, ValueError):
            return "unknown"
        return self.names.get(ranks, f"ranks{list(ranks)}")

    def as_dict(self) -> dict:
        return {str(step): {g: {k: dict(v) for k, v in kinds.items()} for g, kinds in table.items()}
                for step, table in self.steps.items()}

    def summary(self, step: int) -> str:
        """One line: what crossed each group in ``step``."""
        table = self.steps.get(step, {})
        parts = [f"{group}: " + ", ".join(f"{kind} {c['calls']} x, {_size(c['bytes'])}" for kind, c in kinds.items())
                 for group, kinds in sorted(table.items())]
        return "; ".join(parts) or "no collectives"


def _add(table, group: str, kind: str, size: int) -> None:
    entry = table[group][kind]
    entry["calls"] += 1
    entry["bytes"] += size


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _Observer(TorchDispatchMode):
    def __init__(self, observe):
        super().__init__()
        self.observe = observe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d" and func._opname in _KINDS:
            kind, result = _KINDS[func._opname]
            group = next((_unbox(a) for a in args if isinstance(a, torch.ScriptObject) and _unbox(a) is not None), None)
            if group is not None:
                self.observe(group, kind, 0 if result is None else _nbytes(args[result]))
        out = func(*args, **kwargs)
        if func.namespace == "_c10d_functional" and func._opname in _FUNCTIONAL:
            name = kwargs.get("group_name", args[-1] if args and isinstance(args[-1], str) else None)
            group = _resolve(name)
            if group is not None:
                self.observe(group, _FUNCTIONAL[func._opname], _nbytes(out))
        return out


def _resolve(name):
    try:
        return dist.distributed_c10d._resolve_process_group(name)
    except (RuntimeError, ValueError, TypeError):
        return None


def _unbox(obj):
    try:
        return dist.ProcessGroup.unbox(obj)
    except RuntimeError:  # another script object: a ReduceOp, say
        return None
