"""Optimizers on real gloo ranks: sharded parameters and split data give the single-process trajectory."""

import json
import sys
from pathlib import Path

import pytest
import torch
from distributed import torchrun

import zoscale

SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from problems import least_squares, run_steps  # noqa: E402

STEPS = 15
OPTIMIZERS = {
    "mezo": dict(lr=0.02, eps=1e-3, weight_decay=0.1, seed=5),
    "conmezo": dict(lr=0.02, eps=1e-3, weight_decay=0.1, seed=5, cone_theta=1.3, beta=0.9, buffer_dtype="float64"),
    "mezo_svrg": dict(lr=0.01, anchor_lr=0.02, eps=1e-3, q=3, seed=5),
    "pseuzo": dict(lr=0.01, eps=1e-3, window=4, decay=0.7, seed=5),
}


def single_process_run(optimizer):
    params, features, targets = least_squares()
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(params["weight"])
    model.bias = torch.nn.Parameter(params["bias"])

    opt = zoscale.build_optimizer(optimizer, model, **OPTIMIZERS[optimizer])
    predict = lambda index: features[index] @ model.weight.detach().view(-1) + model.bias.detach().sum()  # noqa: E731
    pgs = run_steps(opt, predict, targets, 0, 1, STEPS)
    return pgs, {"weight": model.weight.detach().view(-1), "bias": model.bias.detach().view(-1)}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_ranks_follow_the_single_process_trajectory(world, optimizer, tmp_path):
    pgs, params = single_process_run(optimizer)
    results = torchrun(SCRIPTS / "sharded_least_squares.py", world, tmp_path, str(STEPS), optimizer,
                       json.dumps(OPTIMIZERS[optimizer]))
    for r in results:
        assert r["world"] == world
        # every rank applied the same scalars, and they are the single-process ones
        assert r["projected_grads"] == results[0]["projected_grads"]
        for got, expected in zip(r["projected_grads"], pgs):
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
        for name, value in params.items():
            torch.testing.assert_close(torch.tensor(r["params"][name], dtype=torch.float64), value,
                                       rtol=1e-10, atol=1e-12)


def test_replicated_shards_with_a_data_parallel_comm_count_each_element_once(tmp_path):
    """build_optimizer(shards of whole parameters, comm=data-parallel) without shard_comm: sums over
    elements are not added over the replicas (ConMeZO's dimension was 2x on 2 ranks)."""
    for r in torchrun(SCRIPTS / "replicated_dimension.py", 2, tmp_path):
        assert r["dim"] == r["numel"] == 110
