"""The project's sbatch scripts on a real two-node SLURM cluster started on localhost.

Debian's slurm packages are installed if missing (as root); the cluster lives in a private mount
namespace (unshare) so that the node names resolve without touching the real /etc/hosts. The
scripts run unchanged; only variables differ: a tiny config, CPU ranks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import free_port, run_group

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "scripts" / "slurm_cluster.sh"
# A float32 momentum: a bf16 one turns the loss sums' last-bit differences between 2 ranks and one
# process into bf16 roundings that differ, about 2e-5 of the parameters' norm after 60 steps
RUN = ["steps=6", "eval_every=0", "save_every=0", "data.num_train=48", "data.num_dev=8", "data.num_test=30",
       "batch_size=12", "eval_batch_size=8", "optim.name=conmezo", "optim.buffer_dtype=float32"]


def slurm_available() -> str | None:
    """Why the test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to start SLURM and munge daemons"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    if shutil.which("slurmctld") is None:
        install = subprocess.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends "
                                 "slurmctld slurmd slurm-client munge", shell=True, capture_output=True, timeout=600)
        if install.returncode != 0:
            return f"could not install Debian's slurm packages: {install.stderr.decode()[-300:]}"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare --mount is not permitted here: {probe.stderr.decode().strip()}"
    return None


@pytest.fixture(scope="module")
def local_summary(tmp_path_factory):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    run = tmp_path_factory.mktemp("local") / "run"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(run), *RUN],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("script,extra", [("slurm_torchrun.sbatch", ["backend=fsdp"]),
                                          ("slurm_deepspeed.sbatch", [])])
def test_sbatch_script_completes_and_matches_a_local_run(script, extra, local_summary, tmp_path):
    run = tmp_path / "run"
    cmd = ["unshare", "--mount", "--propagation", "private", str(CLUSTER), str(tmp_path / "cluster"),
           str(REPO / "launch" / script), "--out", str(run), *RUN, *extra]
    env = {"ZOSCALE_PYTHON": sys.executable, "NPROC_PER_NODE": "1", "RDZV_PORT": str(free_port()),
           "MASTER_PORT": str(free_port())}
    done = run_group(cmd, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "JobState=COMPLETED" in done.stdout, done.stdout[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["param_sq_sum"] == pytest.approx(local_summary["param_sq_sum"], rel=1e-6)
    assert summary["eval_after"] == local_summary["eval_after"]
    # under SLURM: shard within a node, replicas across nodes
    key = "fsdp_shard_size" if script == "slurm_torchrun.sbatch" else "zero3_shard_size"
    assert f"{key}: auto" in (run / "config.yaml").read_text()


def test_a_preempted_job_checkpoints_is_requeued_and_ends_on_the_same_trajectory(local_summary, tmp_path):
    """SIGUSR1 to the batch shell mid-run (as `--signal=B:USR1@T` sends ahead of a time limit): the
    ranks checkpoint at a step boundary, the job requeues itself and the restarted script resumes."""
    run = tmp_path / "run"
    steps = ["steps=60" if a.startswith("steps=") else a for a in RUN]
    cmd = ["unshare", "--mount", "--propagation", "private", str(CLUSTER), str(tmp_path / "cluster"),
           str(REPO / "launch" / "slurm_torchrun.sbatch"), "--out", str(run), *steps, "backend=fsdp"]
    env = {"ZOSCALE_PYTHON": sys.executable, "NPROC_PER_NODE": "1", "PREEMPT_WHEN": f"{run / 'metrics.jsonl'}:3",
           "RDZV_PORT": str(free_port())}
    done = run_group(cmd, env=env, timeout=600)
    assert done.returncode == 0 and "JobState=COMPLETED" in done.stdout, done.stdout[-4000:]
    assert "preempted job" in done.stdout and "Restarts=1" in done.stdout, done.stdout[-4000:]
    assert "requeueing job" in done.stdout and "resumed" in done.stdout, done.stdout[-4000:]
    stopped = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stopped == list(range(60)) + [60] * ("split" in (run / "metrics.jsonl").read_text())
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 2 and checkpoints[-1] == "step-00000060", checkpoints  # the preemption's, the end's
    uninterrupted = tmp_path / "uninterrupted"
    reference = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(uninterrupted), *steps],
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    a, b = json.loads((run / "summary.json").read_text()), json.loads((uninterrupted / "summary.json").read_text())
    assert a["param_sq_sum"] == pytest.approx(b["param_sq_sum"], rel=1e-6) and a["eval_after"] == b["eval_after"]
