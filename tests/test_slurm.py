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

from distributed import run_group

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "scripts" / "slurm_cluster.sh"
RUN = ["steps=6", "eval_every=0", "save_every=0", "data.num_train=48", "data.num_dev=8", "data.num_test=30",
       "batch_size=12", "eval_batch_size=8", "optim.name=conmezo"]


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
    done = run_group(cmd, env={"ZOSCALE_PYTHON": sys.executable, "NPROC_PER_NODE": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "JobState=COMPLETED" in done.stdout, done.stdout[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["param_sq_sum"] == pytest.approx(local_summary["param_sq_sum"], rel=1e-6)
    assert summary["eval_after"] == local_summary["eval_after"]
