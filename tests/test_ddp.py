"""`zoscale train` with backend=ddp on real gloo ranks equals the single-process run."""

import json
import subprocess
import sys

import pytest

from distributed import launch

RUN = ["steps=12", "eval_every=6", "save_every=6", "data.num_train=96", "data.num_dev=24", "data.num_test=30",
       "batch_size=12", "eval_batch_size=8"]


def summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("local") / "run"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(run), *RUN, "optim.name=conmezo"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_follow_the_local_trajectory(world, local_run, tmp_path):
    run = tmp_path / "ddp"
    done = launch(world, "-m", "zoscale", "train", "--out", str(run), "backend=ddp", *RUN, "optim.name=conmezo",
                  "check_sync=true", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    a, b = summary(local_run), summary(run)
    # the batch is split over ranks: only the order of the loss sums differs, so floats agree closely
    assert b["param_sq_sum"] == pytest.approx(a["param_sq_sum"], rel=1e-6)
    assert b["param_sum"] == pytest.approx(a["param_sum"], rel=1e-6, abs=1e-6)
    assert b["eval_after"] == a["eval_after"] and b["eval_before"] == a["eval_before"]
    local_pgs = [e["projected_grads"][0] for e in map(json.loads, (local_run / "seeds.jsonl").read_text().splitlines())]
    ddp_pgs = [e["projected_grads"][0] for e in map(json.loads, (run / "seeds.jsonl").read_text().splitlines())]
    # pg = (l+ - l-) / 2eps: fp32 losses of differently composed batches differ by a few ulps (~1e-7),
    # which 1 / 2eps (500) turns into ~1e-4
    assert ddp_pgs == pytest.approx(local_pgs, rel=1e-3, abs=1e-3)


def test_launcher_environment_problems_are_one_line_errors(tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(tmp_path / "r"), "backend=ddp"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "MASTER_ADDR, MASTER_PORT not set" in done.stderr
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "use backend=ddp" in done.stderr
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "backend=ddp"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "--out is required" in done.stderr


def test_the_single_node_launch_script(tmp_path):
    import os
    import signal
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "launch" / "torchrun.sh"
    run = tmp_path / "run"
    env = dict(os.environ, NPROC="2", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", str(script), "--out", str(run), *RUN], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, output[-3000:]
    assert summary(run)["steps"] == 12
    assert "backend: ddp" in (run / "config.yaml").read_text()
