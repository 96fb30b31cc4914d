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


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer_state: dict, trainer_state: dict) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "params.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}))
    for f in tmp.iterdir():
        with open(f, "rb+") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", final.name + "\n")
    return final


def save_best(run_dir: Path, model: torch.nn.Module) -> None:
    """RUN/best/params.safetensors, replaced atomically."""
    best = run_dir / "best"
    best.mkdir(parents=True, exist_ok=True)
    tmp = best / ".params.safetensors.tmp"
    save_file(trainable_state(model), tmp)
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


def load_params(model: torch.nn.Module, checkpoint: Path) -> None:
    saved = load_file(checkpoint / "params.safetensors")
    for name, p in model.named_parameters():
        if name in saved:
            p.data.copy_(saved[name].to(p.dtype))
        elif p.requires_grad:
            raise ValueError(f"checkpoint {checkpoint} has no parameter {name}")


def load(checkpoint: Path) -> tuple[dict, dict]:
    """(optimizer state, trainer state)."""
    return (torch.load(checkpoint / "optimizer.pt", weights_only=False),
            json.loads((checkpoint / "trainer.json").read_text()))
