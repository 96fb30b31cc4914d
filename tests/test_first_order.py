"""First-order baselines (adamw, sgd): backpropagation on the same parameters, data order and
evaluations as the ZO optimizers, in zoscale train and as rows of zoscale compare."""

import json
import shutil
import sys

import pytest
from distributed import REPO, launch, run_group
from runs import summary, zoscale

QUICK = ["eval_every=0", "eval_before=true", "data.num_train=200", "data.num_dev=16", "data.num_test=100",
         "batch_size=16"]


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("adamw") / "run"
    done = zoscale("train", "--out", run, "optim.name=adamw", "optim.lr=1e-3", "steps=120", "save_every=60", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def test_adamw_learns_the_quickstart_beyond_zero_shot(adamw_run):
    s = summary(adamw_run)
    assert s["eval_after"]["accuracy"] > s["eval_before"]["accuracy"] + 0.2, s
    assert s["forward_passes"] == 3 * 120  # a backward counted as two forwards


def test_a_resumed_adamw_run_continues_bit_for_bit(adamw_run, tmp_path):
    """The moments are shard buffers: checkpointed at step 60 and read back on resume."""
    run = tmp_path / "run"
    shutil.copytree(adamw_run, run)
    shutil.rmtree(run / "checkpoints" / "step-00000120")
    (run / "summary.json").unlink()
    done = zoscale("train", "--resume", run, "--steps", 120)
    assert done.returncode == 0 and "at step 60" in done.stdout, done.stderr[-2000:]
    assert summary(run)["param_sq_sum"] == summary(adamw_run)["param_sq_sum"]


BASELINES = {"adamw": ["optim.name=adamw", "optim.lr=1e-3"],
             "sgd": ["optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.1"]}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Each baseline in one process, then on 2 ddp ranks (one launch for both)."""
    out, script = tmp_path_factory.mktemp("baselines"), str(REPO / "tests" / "scripts" / "train_runs.py")
    plan = [[name, [*args, "steps=8", "save_every=0", *QUICK], False] for name, args in BASELINES.items()]
    done = run_group([sys.executable, script, str(out), json.dumps(plan)], timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    ranks = [[f"ddp-{name}", [*args, "backend=ddp"], False] for name, args, _ in plan]
    done = launch(2, script, str(out), json.dumps(ranks), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    return out


@pytest.mark.parametrize("optimizer", list(BASELINES))
def test_ddp_ranks_follow_the_single_process_trajectory(optimizer, ddp_runs):
    a, b = summary(ddp_runs / optimizer), summary(ddp_runs / f"ddp-{optimizer}")
    # the gradients are summed over ranks: only the order of the float sums differs
    assert b["param_sq_sum"] == pytest.approx(a["param_sq_sum"], rel=1e-6)
    assert b["eval_after"] == a["eval_after"]
    # one all-reduce of the gradients and one of the loss a step, besides the stop flag's
    ledger = json.loads((ddp_runs / f"ddp-{optimizer}" / "comm.json").read_text())["1"]["world"]["all_reduce"]
    assert ledger["calls"] == 3


def test_sharded_backends_are_refused_in_one_line(tmp_path):
    done = zoscale("train", "--out", tmp_path / "run", "optim.name=adamw", "backend=fsdp", *QUICK)
    assert done.returncode == 2 and "adamw backpropagates through whole parameters" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_compare_puts_the_ft_ceiling_beside_each_zo_row(tmp_path):
    out = tmp_path / "cmp"
    done = zoscale("compare", "--optimizers", "mezo,adamw", "--seeds", 1, "--steps", 60, "--evals", 2, "--out", out,
                   "data.num_train=64", "data.num_dev=8", "data.num_test=32", "batch_size=8", "adamw:optim.lr=1e-3")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ceiling"] == "adamw" and report["rows"]["adamw"]["steps"] == 40  # 3 passes a step, 120 in all
    rows, zero = report["rows"], report["zero_shot"]
    gain = rows["adamw"]["final"][0] - zero
    assert rows["mezo"]["of_ft_gain"] == pytest.approx((rows["mezo"]["final"][0] - zero) / gain)
    assert rows["adamw"]["of_ft_gain"] == pytest.approx(1.0)
    assert "FT ceiling: adamw's mean final score" in (out / "report.md").read_text()
    # forward passes to 90% of FT's final score: the first evaluation at or above it, per seed
    target = 0.9 * rows["adamw"]["final"][0]
    for name, row in rows.items():
        first = next((p["forward_passes"] for p in report["runs"][name][0]["test"] if p["score"] >= target), None)
        assert row["passes_to_ft90"] == first and row["ft90_reached"] == f"{int(first is not None)}/1"
    assert rows["adamw"]["passes_to_ft90"] is not None
