"""Run a script on N local ranks with torchrun; the ranks write their results, the test reads them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_group(cmd: list[str], env: dict | None = None, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a process group of its own (stdout and stderr together); the whole group is
    killed on a timeout, so a hung collective or a launcher's children cannot outlive the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return communicate(proc, timeout)


def communicate(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """``proc``'s outputs and exit code; on a timeout its whole process group is killed first."""
    try:
        output, errors = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, proc.args))} timed out after {timeout}s:\n"
                             f"{(errors or output)[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, errors or "")


def launch(nproc: int, *program: str, timeout: float = 180.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc PROGRAM...`` (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *program]
    return run_group(cmd, env=env, timeout=timeout)


def torchrun(script: Path, nproc: int, out_dir: Path, *args: str, timeout: float = 180.0) -> list[dict]:
    """Start ``script`` on ``nproc`` ranks; return each rank's ``rank{r}.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = launch(nproc, str(script), str(out_dir), *args, timeout=timeout)
    output = proc.stdout
    results = []
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result (exit {proc.returncode}):\n{output[-4000:]}"
        results.append(json.loads(path.read_text()))
    return results


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``path`` (a run's metrics.jsonl) has ``count`` lines: training has started."""
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= count):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.05)


def free_port() -> int:
    """A port nothing listens on now: launchers given one do not collide with tests running beside them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
