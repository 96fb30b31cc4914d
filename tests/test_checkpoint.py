"""Checkpoints: sharded pieces read back on other layouts, an interrupted save, the best parameters, and a run
of non-finite losses."""

import pytest
import torch

from zoscale.config import load
from zoscale.engine import Shard, ShardBuffer
from zoscale.quickstart import QUICKSTART
from zoscale.train import checkpoint
from zoscale.train.losses import Batch
from zoscale.train.trainer import NonFiniteLossError, Trainer

SMALL = ["data.num_train=64", "data.num_dev=16", "data.num_test=16", "eval_every=0", "log_every=1"]


def trainer(run_dir, *overrides):
    return Trainer(load(QUICKSTART, [*SMALL, *overrides]), run_dir)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    t = trainer(tmp_path / "run", "steps=6", "save_every=3")
    for step in range(3):
        t.train_step(t.batch(step))
    t.step = 3
    t.save()
    saved = {s.name: s.tensor.clone() for s in t.optimizer.shards}
    t.train_step(t.batch(3))
    t.step = 4

    def crash(*args, **kwargs):
        raise OSError("disk full")  # in the middle of writing the new checkpoint

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError):
        t.save()
    monkeypatch.undo()
    path = checkpoint.latest(tmp_path / "run" / "checkpoints")
    assert path.name == "step-00000003"
    optimizer_state, trainer_state = checkpoint.load(path, t.comm)
    assert trainer_state["step"] == 3 and optimizer_state["step"] == 3
    fresh = trainer(tmp_path / "other", "steps=6")
    checkpoint.read_shards(path, fresh.optimizer.shards)
    for shard in fresh.optimizer.shards:
        assert torch.equal(shard.tensor, saved[shard.name])
    t.save()  # the next save succeeds and clears the leftover
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == "step-00000004"
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
    path = checkpoint.latest(tmp_path / "run" / "checkpoints")
    assert path.name == "step-00000010"  # saved at 10 with 4 skipped (restored, not updated) steps
    _, state = checkpoint.load(path, t.comm)
    assert state["consecutive_nonfinite"] == 3 and state["total_nonfinite"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint.whole_params(path).values())


def layout(whole: dict[str, torch.Tensor], world: int, rank: int) -> list[Shard]:
    """ZeRO-3's flat partition of each tensor for one rank: ceil(numel / world) elements."""
    shards = []
    for name, t in whole.items():
        size = -(-t.numel() // world)
        lo, hi = min(rank * size, t.numel()), min((rank + 1) * size, t.numel())
        shards.append(Shard(name, t.reshape(-1)[lo:hi].clone(), offset=lo, global_numel=t.numel()))
    return shards


def test_pieces_saved_on_2_ranks_are_read_back_on_3_and_whole(tmp_path):
    whole = {"a.weight": torch.randn(7, 5), "b.bias": torch.randn(3).to(torch.bfloat16), "c": torch.randn(1)}
    for rank in range(2):
        shards = layout(whole, 2, rank)
        momentum = ShardBuffer([s.tensor.float() * 2 for s in shards])
        checkpoint.write_shards(tmp_path, rank, shards, {"momentum": momentum})
    for rank in range(3):
        expected = layout(whole, 3, rank)
        shards = [Shard(s.name, torch.zeros_like(s.tensor), offset=s.offset, global_numel=s.global_numel)
                  for s in expected]
        momentum = ShardBuffer([torch.zeros(s.numel) for s in shards])
        checkpoint.read_shards(tmp_path, shards, {"momentum": momentum})
        for got, want, buffer in zip(shards, expected, momentum.tensors):
            assert torch.equal(got.tensor, want.tensor) and torch.equal(buffer, want.tensor.float() * 2)
    assert all(torch.equal(t.reshape(-1), checkpoint.whole_params(tmp_path)[n]) for n, t in whole.items())


def test_a_missing_piece_is_an_error_not_zeros(tmp_path):
    whole = {"w": torch.randn(10)}
    checkpoint.write_shards(tmp_path, 0, layout(whole, 2, 0), {})  # rank 1's file never written
    with pytest.raises(ValueError, match="no complete param w"):
        checkpoint.read_shards(tmp_path, layout(whole, 1, 0))
    with pytest.raises(ValueError, match="no complete momentum w"):
        checkpoint.read_shards(tmp_path, layout(whole, 2, 0), {"momentum": ShardBuffer([torch.zeros(5)])})


def test_the_best_parameters_replace_the_previous_best(tmp_path):
    t = trainer(tmp_path / "run", "steps=4")
    first = checkpoint.save_best(t.run_dir, 1, t.optimizer.shards, t.comm, owns_shards=True)
    t.train_step(t.batch(0))
    second = checkpoint.save_best(t.run_dir, 2, t.optimizer.shards, t.comm, owns_shards=True)
    assert checkpoint.latest(t.run_dir / "best") == second and not first.exists()
    for shard in t.optimizer.shards:
        assert torch.equal(checkpoint.whole_params(second)[shard.name], shard.tensor.reshape(-1))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    trainer(tmp_path / "run", "steps=8", "save_every=2", "keep_checkpoints=2").run()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000008"]
    assert checkpoint.latest(root).name == "step-00000008"
