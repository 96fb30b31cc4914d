"""`zoscale train` with backend=ddp on real gloo ranks equals the single-process run."""

import json
import subprocess
import sys

import pytest
from distributed import free_port, launch, run_group

RUN = ["steps=12", "eval_every=6", "save_every=6", "data.num_train=96", "data.num_dev=24", "data.num_test=30",
       "batch_size=12", "eval_batch_size=8"]
# a float32 momentum: a bf16 one rounds the last-bit differences of the ranks' loss sums into the
# trajectory (1.2e-6 relative after 12 steps on 3 ranks on some CPUs), which is not what this compares
CONMEZO = ["optim.name=conmezo", "optim.buffer_dtype=float32"]


def summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("local") / "run"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(run), *RUN, *CONMEZO],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_follow_the_local_trajectory(world, local_run, tmp_path):
    run = tmp_path / "ddp"
    done = launch(world, "-m", "zoscale", "train", "--out", str(run), "backend=ddp", *RUN, *CONMEZO,
                  "check_sync=true", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    a, b = summary(local_run), summary(run)
    # the batch is split over ranks: only the order of the loss sums differs, so floats agree closely
    assert b["param_sq_sum"] == pytest.approx(a["param_sq_sum"], rel=1e-6)
    assert b["param_sum"] == pytest.approx(a["param_sum"], rel=1e-6, abs=1e-6)
    assert b["eval_after"] == a["eval_after"] and b["eval_before"] == a["eval_before"]
    written = {f.name for f in (run / "checkpoints").glob("step-*/shards-rank*.safetensors")}
    assert written == {"shards-rank0.safetensors"}  # replicas: rank 0 writes the one copy
    local_pgs = [e["projected_grads"][0] for e in map(json.loads, (local_run / "seeds.jsonl").read_text().splitlines())
                 if "step" in e]
    ddp_pgs = [e["projected_grads"][0] for e in map(json.loads, (run / "seeds.jsonl").read_text().splitlines())
               if "step" in e]
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
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "launch" / "torchrun.sh"
    run = tmp_path / "run"
    env = {"NPROC": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = run_group(["bash", str(script), "--out", str(run), *RUN], env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert summary(run)["steps"] == 12
    assert "backend: ddp" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("config,backend", [("fsdp2.yaml", "fsdp"), ("zero3.yaml", "deepspeed")])
def test_accelerate_launch_with_the_shipped_configs(config, backend, local_run, tmp_path):
    """accelerate only starts the ranks (zoscale shards the model itself), so its MULTI_GPU configs
    run on CPU too; --num_processes 2 is the one change."""
    from pathlib import Path

    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    shipped = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / config
    run = tmp_path / "run"
    done = run_group([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(shipped),
                      "--num_processes", "2", "--main_process_port", str(free_port()),
                      "-m", "zoscale", "train", "--out", str(run), *RUN,
                      *CONMEZO, f"backend={backend}"], timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    trainer_state = json.loads((run / "checkpoints" / "step-00000012" / "trainer.json").read_text())
    assert trainer_state["world_size"] == 2
    assert summary(run)["param_sq_sum"] == pytest.approx(summary(local_run)["param_sq_sum"], rel=1e-6)


def test_a_dead_rank_ends_the_whole_job_promptly(tmp_path):
    """SIGKILL one rank mid-run: the job exits non-zero within a bounded time, no rank left hanging."""
    import os
    import signal
    import time

    import psutil
    from distributed import REPO, wait_for_lines

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zoscale",
           "train", "--out", str(run), "backend=ddp", "steps=100000", "eval_every=0", "save_every=0",
           "eval_before=false", "data.num_dev=0", "data.num_test=8", "collective_timeout_s=30"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_lines(run / "metrics.jsonl", 5, proc)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "zoscale" in " ".join(p.cmdline())]
        victim = next(p for p in ranks if p.environ().get("RANK") == "1")
        killed = time.time()
        victim.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=90)
        assert code != 0
        assert time.time() - killed < 60
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
