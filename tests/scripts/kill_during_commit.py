"""Kill a run with SIGKILL at every file operation of one checkpoint commit, and resume each time.

    kill_during_commit.py OUT STRIDE [key=value ...]

The run trains to step 6 with checkpoints at 2 and 4 (keep_checkpoints=1, so the commit of step 4
also deletes step 2). A reference run counts the file operations of the step-4 commit (os.mkdir,
os.fsync, os.replace, os.unlink, os.rmdir, shutil.rmtree); then for each n a run is killed at
its n-th operation (n = 1, 1 + STRIDE, ..., and the last) and `zoscale train --resume` continues
it to step 6. Runs are forked from this process, which imports everything once (what a fresh
process spends most of its time on) and computes nothing itself. OUT/results.json: the
reference's summary and seed log, and per n whether the kill happened and what the resume gave.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "COMPATIBLE")  # bitwise-reproducible matrix products (tests/conftest.py)

import datasets  # noqa: F401  (imported once here, not in every forked run)
from transformers import AutoTokenizer, OPTForCausalLM  # noqa: F401

from zoscale import cli, models  # noqa: F401
from zoscale.train import checkpoint, data, evaluate, losses, trainer  # noqa: F401

out, stride = Path(sys.argv[1]), int(sys.argv[2])
RUN = ["steps=6", "save_every=2", "keep_checkpoints=1", "eval_every=0", "eval_before=false", "data.num_train=64",
       "data.num_dev=8", "data.num_test=16", *sys.argv[3:]]
OPERATIONS = [(os, "mkdir"), (os, "fsync"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")]
state = {"armed": False, "count": 0, "kill_at": 0}


def counted(fn):
    def wrapper(*args, **kwargs):
        if state["armed"]:
            state["count"] += 1
            if state["count"] == state["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapper


def arming(save):
    def wrapper(run_dir, step, *args, **kwargs):
        state["armed"] = step == 4
        try:
            return save(run_dir, step, *args, **kwargs)
        finally:
            if state["armed"]:
                (out / "operations").write_text(str(state["count"]))
            state["armed"] = False
    return wrapper


for module, name in OPERATIONS:
    setattr(module, name, counted(getattr(module, name)))
checkpoint.save = arming(checkpoint.save)


def forked(argv: list[str], kill_at: int = 0) -> int:
    """The exit status of `zoscale ARGV` in a child process (negative: the signal that ended it)."""
    pid = os.fork()
    if pid == 0:
        state["kill_at"] = kill_at
        sys.stdout = sys.stderr = open(out / "log.txt", "a")
        os._exit(cli.main(argv))
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def outcome(run: Path) -> dict:
    summary = run / "summary.json"
    return {"summary": json.loads(summary.read_text()) if summary.exists() else None,
            "seeds": (run / "seeds.jsonl").read_text() if (run / "seeds.jsonl").exists() else None}


out.mkdir(parents=True, exist_ok=True)
reference = out / "reference"
results = {"reference_exit": forked(["train", "--out", str(reference), *RUN]), **outcome(reference), "runs": {}}
operations = int((out / "operations").read_text())
results["operations"] = operations
for n in sorted({*range(1, operations + 1, stride), operations}):
    run = out / f"killed-at-{n}"
    killed = forked(["train", "--out", str(run), *RUN], kill_at=n)
    resumed = forked(["train", "--resume", str(run), "--steps", "6"])
    results["runs"][n] = {"first_exit": killed, "resume_exit": resumed, **outcome(run)}
(out / "results.json").write_text(json.dumps(results))
