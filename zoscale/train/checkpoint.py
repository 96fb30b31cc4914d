"""Sharded, resumable checkpoints, written atomically.

    RUN/checkpoints/step-00001000/
        shards-rank{r}.safetensors   rank r's pieces: param/NAME@OFFSET, and the optimizer's shard
                                     buffers (master/..., momentum/..., anchor/...) laid out the same;
                                     pieces on NVMe in shards-rank{r}-part{i}.safetensors, a batch each
        optimizer-rank{r}.pt         rank r's optimizer scalars (step, norms, seeds)
        trainer.json                 the loop's state and the world size
    RUN/checkpoints/latest           a one-line pointer, replaced last
    RUN/best/step-.../ and best/latest   the best dev parameters, the same way

Each piece is a flat run of a parameter's elements at its global offset (the shard's own
coordinates, invariant 1), so no rank ever gathers a whole parameter and a checkpoint resumes on
any backend and world size: every rank reads just the elements of the saved pieces that overlap its
shards. Ranks holding whole replicas (local, ddp) write one copy, from rank 0. A directory is written
under a temporary name, flushed and renamed, and only then is the pointer replaced, so a kill at any
moment leaves the previous checkpoint usable. Only trainable parameters are saved: the rest is
rebuilt from the config, which the run directory also holds.

Why not torch.distributed.checkpoint: DTensor cannot describe ZeRO-3's flat partitions, and the
form DCP has for arbitrary chunks (ShardedTensor) is deprecated; safetensors pieces keyed by offset
keep one format for every backend and are read lazily, element range by element range.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zoscale.engine import Shard, ShardBuffer, resident
from zoscale.engine.comm import Comm
from zoscale.errors import CheckpointError
from zoscale.train.rundir import fsync_dir, write_atomic


def _save_synced(write: Callable[[Path], object], path: Path) -> None:
    write(path)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def _commit(root: Path, name: str, comm: Comm, write_rank: Callable[[Path], None],
            write_main: Callable[[Path], None], keep: int = 0) -> Path:
    """Every rank calls this: root/.tmp-NAME is made, each rank writes its files into it and
    hashes its share of them, rank 0 writes the manifest last, renames the directory to root/NAME,
    points root/latest at it, and then deletes all but the newest ``keep`` directories (0: none).

    A complete root/NAME is never deleted to make room for a new one: it is the same step of the
    same trajectory, so it stays and nothing is written."""
    final, tmp = root / name, root / f".tmp-{name}"
    already = comm.all_reduce_sum([float(comm.is_main and problem(final) is None)])[0]
    if already:
        if comm.is_main:
            write_atomic(root / "latest", final.name + "\n")
        return final
    if comm.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
        tmp.mkdir()
    comm.barrier()
    write_rank(tmp)
    comm.barrier()
    if comm.is_main:
        write_main(tmp)
    comm.barrier()
    files = _listing(tmp)  # every rank hashes a share of every rank's files
    mine = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            for i, f in enumerate(files) if i % comm.world_size == comm.rank}
    _save_synced(lambda f: f.write_text(json.dumps(mine)), tmp / f".sums-rank{comm.rank}.json")
    comm.barrier()
    if comm.is_main:
        manifest = {}
        for r in range(comm.world_size):
            sums = tmp / f".sums-rank{r}.json"
            manifest.update(json.loads(sums.read_text()))
            sums.unlink()
        _save_synced(lambda f: f.write_text(json.dumps({"format": 1, "files": manifest}, indent=1)), tmp / MANIFEST)
        if final.exists():  # an incomplete leftover of this step: nothing in it can be resumed
            stale = root / f".stale-{name}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        fsync_dir(root)
        write_atomic(root / "latest", final.name + "\n")
        if keep:
            for stale in sorted(root.glob("step-*"))[:-keep]:
                if stale != final:
                    shutil.rmtree(stale)
    comm.barrier()
    return final


MANIFEST = "manifest.json"  # written last: the files of a checkpoint, their sizes and sha256
CHECKPOINT_NAME = re.compile(r"^step-\d{8}$")


def problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint, checksums aside (None if it is)."""
    return _manifest(directory)[1]


def _manifest(directory: Path) -> tuple[list, str | None]:
    """The manifest's (file, expected) pairs, and why the directory is incomplete, checksums aside:
    its manifest is missing, or a file it lists is missing or of another size (None if neither)."""
    try:
        files = sorted(json.loads((directory / MANIFEST).read_text())["files"].items())
    except FileNotFoundError:
        return [], "no manifest (the save did not finish, or an older zoscale wrote it)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [], f"unreadable manifest ({e})"
    for file, expected in files:
        path = directory / file
        if not path.is_file():
            return files, f"{file} is missing"
        if path.stat().st_size != expected["bytes"]:
            return files, f"{file} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
    return files, None


def _unusable(path: Path, expected: dict | None) -> int:
    """0 if this file can be used; 1 if it does not match its checksum (``expected``); 2 if it
    cannot be read, or a safetensors file's header does not parse (what passes a manifest that was
    rewritten to match)."""
    try:
        if expected is not None and _sha256(path) != expected["sha256"]:
            return 1
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key).get_shape()
        elif expected is None:
            with open(path, "rb") as f:
                f.read(1)
    except Exception:  # noqa: BLE001 - whatever reading a damaged file raises (OSError, SafetensorError)
        return 2
    return 0


@dataclass
class Found:
    path: Path | None  # the newest complete checkpoint
    skipped: list[tuple[str, str]]  # newer ones that are not complete: (name, why)

    def describe(self) -> str:
        return "; ".join(f"skipped {name}: {why}" for name, why in self.skipped)

    def report(self, flag: str) -> Path | None:
        """The checkpoint found, after a line naming the newer ones skipped and why (if any)."""
        if self.skipped:
            print(f"{flag}: {self.describe()}; {'using ' + self.path.name if self.path else 'none is complete'}")
        return self.path


def find(root: Path, comm: Comm | None = None, checksums: bool = True) -> Found:
    """The newest complete checkpoint under ``root`` (RUN/checkpoints or RUN/best), its checksums
    verified unless ``checksums`` is False: the ranks share the hashing, and they all choose the
    same directory. The ``latest`` pointer is for people: it is never followed, so no file in a run
    can point outside it."""
    comm = comm or Comm()
    names = sorted((p.name for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir()),
                   reverse=True) if root.is_dir() else []
    skipped = []
    for name in names:
        directory = root / name
        files, reason = _manifest(directory)
        if reason is None:  # every rank checks a share of the files
            bad = comm.all_reduce_sum([float(i % comm.world_size == comm.rank and
                                             _unusable(directory / f, e if checksums else None))
                                       for i, (f, e) in enumerate(files)])
            wrong = [(f, b) for (f, _), b in zip(files, bad) if b]
            if wrong:
                file, code = wrong[0]
                reason = f"{file} {'does not match its checksum' if code == 1 else 'cannot be read'}"
        if reason is None:
            return Found(directory, skipped)
        skipped.append((name, reason))
    return Found(None, skipped)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root (RUN/checkpoints or RUN/best), in this process."""
    return find(root).path


def write_shards(directory: Path, rank: int, shards: Sequence[Shard], buffers: dict[str, ShardBuffer]) -> None:
    """directory/shards-rank{rank}.safetensors: the shards' elements and the buffers'. Shards on
    NVMe go to one more file per batch (-part{i}), so host memory holds a batch at a time."""
    def write(pieces: dict[str, torch.Tensor], suffix: str) -> None:
        pieces = {key: t.detach().reshape(-1).cpu() for key, t in pieces.items() if t.numel()}
        _save_synced(lambda f: save_file(pieces, f), directory / f"shards-rank{rank}{suffix}.safetensors")

    in_memory = {f"{kind}/{s.name}@{s.offset}": t for kind, buffer in buffers.items()
                 for s, t in zip(shards, buffer.tensors) if s.primary}
    for i, batch in enumerate(resident(shards)):
        params = {f"param/{s.name}@{s.offset}": s.tensor for s in batch if s.primary}
        if batch[0].storage is None:
            in_memory.update(params)
        else:
            write(params, f"-part{i}")
    write(in_memory, "")


class PieceReader:
    """The saved pieces of a checkpoint directory, every rank's, opened once (headers only):
    ``fill`` copies into a tensor just the saved elements that overlap it."""

    def __init__(self, directory: Path):
        self.directory = directory
        files = sorted(directory.glob("shards-rank*.safetensors"))
        if not files:
            raise ValueError(f"{directory} holds no shards-rank*.safetensors")
        self._stack = contextlib.ExitStack()
        self.pieces = defaultdict(list)  # (kind, name) -> [(offset, numel, handle, key)]
        for file in files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            for key in handle.keys():
                kind_name, offset = key.rsplit("@", 1)
                kind, name = kind_name.split("/", 1)
                self.pieces[kind, name].append((int(offset), handle.get_slice(key).get_shape()[0], handle, key))

    def __enter__(self) -> PieceReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self, kind: str = "param") -> list[str]:
        return [name for k, name in self.pieces if k == kind]

    def numel(self, name: str, kind: str = "param") -> int:
        return max(offset + numel for offset, numel, _, _ in self.pieces[kind, name])

    def fill(self, kind: str, shard: Shard, tensor: torch.Tensor) -> None:
        """tensor (laid out like ``shard``) <- the saved elements of its range."""
        flat, filled = tensor.view(-1), 0
        for offset, numel, handle, key in self.pieces[kind, shard.name]:
            lo, hi = max(offset, shard.offset), min(offset + numel, shard.offset + shard.numel)
            if lo < hi:
                flat[lo - shard.offset : hi - shard.offset].copy_(handle.get_slice(key)[lo - offset : hi - offset])
                filled += hi - lo
        if filled != shard.numel:
            raise ValueError(f"checkpoint {self.directory} has no complete {kind} {shard.name}")

    def whole(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One saved parameter, whole and flattened."""
        numel, (_, _, handle, key) = self.numel(name), self.pieces["param", name][0]
        out = torch.empty(numel, dtype=dtype or handle.get_slice(key)[0:0].dtype)  # the saved dtype by default
        self.fill("param", Shard(name, out, offset=0, global_numel=numel), out)
        return out


def read_shards(directory: Path, shards: Sequence[Shard], buffers: dict[str, ShardBuffer] | None = None) -> None:
    """Fill the shards (and buffers) in place from pieces saved on any layout: of each saved piece,
    only the elements that overlap a shard are read."""
    with PieceReader(directory) as reader:
        for batch in resident(shards):
            for shard in batch:
                reader.fill("param", shard, shard.tensor)
        for kind, buffer in (buffers or {}).items():
            for shard, tensor in zip(shards, buffer.tensors):
                reader.fill(kind, shard, tensor)


def whole_params(directory: Path) -> dict[str, torch.Tensor]:
    """Every saved parameter, whole and flattened, in this process (for inspection of small models)."""
    with PieceReader(directory) as reader:
        return {name: reader.whole(name) for name in reader.names()}


def save(run_dir: Path, step: int, shards: Sequence[Shard], buffers: dict[str, ShardBuffer], optimizer_state: dict,
         trainer_state: dict, comm: Comm, owns_shards: bool, keep: int = 0) -> Path:
    """Every rank calls this. ``owns_shards``: this rank writes its pieces (False on the ranks of
    a replicated layout other than rank 0); ``keep``: how many checkpoints stay (0: all)."""
    def write_rank(tmp: Path) -> None:
        if owns_shards:
            write_shards(tmp, comm.rank, shards, buffers)
        _save_synced(lambda f: torch.save(optimizer_state, f), tmp / f"optimizer-rank{comm.rank}.pt")

    def write_main(tmp: Path) -> None:
        state = {"step": step, "world_size": comm.world_size, **trainer_state}
        _save_synced(lambda f: f.write_text(json.dumps(state)), tmp / "trainer.json")

    return _commit(run_dir / "checkpoints", f"step-{step:08d}", comm, write_rank, write_main, keep)


def save_best(run_dir: Path, step: int, shards: Sequence[Shard], comm: Comm, owns_shards: bool) -> Path:
    """RUN/best/step-N: the parameters only; the previous best is removed once replaced."""
    def write_rank(tmp: Path) -> None:
        if owns_shards:
            write_shards(tmp, comm.rank, shards, {})

    def write_main(tmp: Path) -> None:
        _save_synced(lambda f: f.write_text(json.dumps({"step": step})), tmp / "trainer.json")

    return _commit(run_dir / "best", f"step-{step:08d}", comm, write_rank, write_main, keep=1)


def load(checkpoint: Path, comm: Comm) -> tuple[dict, dict]:
    """(optimizer scalars for this rank, trainer state); the shards are read by ``read_shards``.
    Saved on another number of ranks, rank 0's scalars serve (they agree on every rank), without
    a PseuZO window of per-rank micro-batch outputs (pairing="current"), meaningless on another split.
    Nothing in a run directory is unpickled: the optimizer files are read as tensors and plain values."""
    trainer_state = json.loads((checkpoint / "trainer.json").read_text())
    same_world = trainer_state["world_size"] == comm.world_size
    path = checkpoint / f"optimizer-rank{comm.rank if same_world else 0}.pt"
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values; it was not loaded "
                              f"(loading it could run code)") from None
    if not same_world and any(d.dim() for _, d in state.get("window", [])):
        state["window"] = []
    return state, trainer_state
