"""Failure paths of training: an interrupted save and a run of non-finite losses."""

import pytest
import torch
from safetensors.torch import load_file

from zoscale import checkpoint
from zoscale.commands import QUICKSTART
from zoscale.config import load
from zoscale.losses import Batch
from zoscale.trainer import NonFiniteLossError, Trainer

SMALL = ["data.num_train=64", "data.num_dev=16", "data.num_test=16", "eval_every=0", "log_every=1"]


def trainer(run_dir, *overrides):
    return Trainer(load(QUICKSTART, [*SMALL, *overrides]), run_dir)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    t = trainer(tmp_path / "run", "steps=6", "save_every=3")
    for step in range(3):
        t.train_step(t.batch(step))
    t.step = 3
    t.save()
    saved = checkpoint.trainable_state(t.model)
    t.train_step(t.batch(3))
    t.step = 4

    def crash(*args, **kwargs):
        raise OSError("disk full")  # in the middle of writing the new checkpoint

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError):
        t.save()
    monkeypatch.undo()
    path = checkpoint.latest(tmp_path / "run")
    assert path.name == "step-00000003"
    optimizer_state, trainer_state = checkpoint.load(path, t.comm)
    assert trainer_state["step"] == 3 and optimizer_state["step"] == 3
    fresh = trainer(tmp_path / "other", "steps=6")
    checkpoint.apply_params(fresh.model, checkpoint.load_params(path))
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p.detach(), saved[name])
    t.save()  # the next save succeeds and clears the leftover
    assert checkpoint.latest(tmp_path / "run").name == "step-00000004"
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_too_many_non_finite_losses_stop_the_run_with_the_checkpoint_intact(tmp_path, monkeypatch):
    t = trainer(tmp_path / "run", "steps=30", "save_every=5", "max_nonfinite=3")
    real = Batch.loss
    calls = {"n": 0}

    def loss(self, model):
        calls["n"] += 1
        return (float("nan"), 1) if calls["n"] > 2 * 7 else real(self, model)  # steps 7 and later: NaN

    monkeypatch.setattr(Batch, "loss", loss)
    with pytest.raises(NonFiniteLossError, match="4 consecutive non-finite losses up to step 10"):
        t.run()
    path = checkpoint.latest(tmp_path / "run")
    assert path.name == "step-00000010"  # saved at 10 with 4 skipped (restored, not updated) steps
    _, state = checkpoint.load(path, t.comm)
    assert state["consecutive_nonfinite"] == 3 and state["total_nonfinite"] == 3
    assert all(torch.isfinite(v).all() for v in load_file(path / "params.safetensors").values())
