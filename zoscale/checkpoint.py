"""Resumable checkpoints, written atomically.

RUN/checkpoints/step-00001000/{params.safetensors, optimizer.pt, trainer.json} is written under a
temporary name, flushed to disk and renamed; RUN/checkpoints/latest (a one-line file) is then
replaced atomically. A kill at any moment leaves the previous checkpoint and pointer usable.
Only trainable parameters are saved: the rest is rebuilt from the config (a pretrained id or a
seeded config), which the run directory also holds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zoscale.comm import Comm


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy (never a view: callers restore from it) of the trainable parameters, on the CPU.
    named_parameters() lists a tied weight once, so no two entries share storage."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save(run_dir: Path, step: int, params: dict[str, torch.Tensor], optimizer_state: dict, trainer_state: dict,
         comm: Comm) -> Path:
    """Every rank calls this: each writes its own optimizer state (sharded buffers stay per rank),
    rank 0 the parameters (whole) and the trainer state, then renames the directory."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if comm.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
        tmp.mkdir()
    comm.barrier()
    _save_synced(lambda f: torch.save(optimizer_state, f), tmp / f"optimizer-rank{comm.rank}.pt")
    comm.barrier()
    if comm.is_main:
        _save_synced(lambda f: save_file(params, f), tmp / "params.safetensors")
        state = {"step": step, "world_size": comm.world_size, **trainer_state}
        _save_synced(lambda f: f.write_text(json.dumps(state)), tmp / "trainer.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", final.name + "\n")
    comm.barrier()
    return final


def _save_synced(write, path: Path) -> None:
    write(path)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def save_best(run_dir: Path, params: dict[str, torch.Tensor]) -> None:
    """RUN/best/params.safetensors, replaced atomically."""
    best = run_dir / "best"
    best.mkdir(parents=True, exist_ok=True)
    tmp = best / ".params.safetensors.tmp"
    save_file(params, tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, best / "params.safetensors")
    _fsync_dir(best)


def latest(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer.json").exists() else None


def load_params(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "params.safetensors")


def apply_params(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved whole parameters into an unsharded model's trainable parameters."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name not in saved:
                raise ValueError(f"checkpoint has no parameter {name}")
            p.data.copy_(saved[name].to(p.dtype))


def load(checkpoint: Path, comm: Comm) -> tuple[dict, dict]:
    """(optimizer state for this rank, trainer state). Saved on another number of ranks, the
    per-shard buffers of every rank are merged (the optimizer re-slices them for its own shards)."""
    trainer_state = json.loads((checkpoint / "trainer.json").read_text())
    files = sorted(checkpoint.glob("optimizer-rank*.pt"), key=lambda f: int(f.stem.removeprefix("optimizer-rank")))
    if trainer_state["world_size"] == comm.world_size:
        return torch.load(checkpoint / f"optimizer-rank{comm.rank}.pt", weights_only=False), trainer_state
    states = [torch.load(f, weights_only=False) for f in files]
    merged = dict(states[0])
    for key in ("buffer", "anchor"):
        if key in merged:
            merged[key] = {k: v for state in states for k, v in state[key].items()}
    if merged.get("window"):
        merged["window"] = []  # per-rank micro-batch outputs: meaningless on another split
    return merged, trainer_state
