"""What an unlucky operator does to a run: crafted files, a second writer, kills, torn logs, damaged
checkpoints, signals, divergence, launcher mistakes. Each test fails on the code before issue 13."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from distributed import REPO, run_group, wait_for_lines
from runs import lines, zoscale

from zoscale.config import load
from zoscale.quickstart import QUICKSTART
from zoscale.train import checkpoint
from zoscale.train.checkpoint import MANIFEST
from zoscale.train.rundir import RunDirectory
from zoscale.train.signals import EXIT_PREEMPTED
from zoscale.train.trainer import NonFiniteLossError, Trainer

SMALL = ["eval_every=0", "eval_before=false", "data.num_train=64", "data.num_dev=8", "data.num_test=16",
         "log_every=1"]


def one_line_error(done, code=2) -> str:
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("zoscale: error")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 12-step run, checkpoints at 4 and 8."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = zoscale("train", "--out", run, "steps=12", "save_every=4", *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def copy_run_until(reference: Path, step: int, to: Path) -> Path:
    """The reference run as a kill right after its step-``step`` checkpoint would have left it."""
    shutil.copytree(reference, to)
    for name in ("metrics.jsonl", "seeds.jsonl"):
        kept = [line for line in (to / name).read_text().splitlines() if json.loads(line).get("step", -1) < step]
        (to / name).write_text("".join(line + "\n" for line in kept))
    for path in (to / "checkpoints").glob("step-*"):
        if int(path.name[5:]) > step:
            shutil.rmtree(path)
    (to / "summary.json").unlink()
    return to


def rewrite_manifest(directory: Path) -> None:
    """What an attacker who edits a checkpoint can do too: sums that match the edited files."""
    files = json.loads((directory / MANIFEST).read_text())["files"]
    for name in files:
        files[name] = {"bytes": (directory / name).stat().st_size, "sha256": checkpoint._sha256(directory / name)}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}))


def assert_same_trajectory(run: Path, reference: Path) -> None:
    a, b = json.loads((run / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    assert (a["param_sum"], a["param_sq_sum"], a["eval_after"]) == (b["param_sum"], b["param_sq_sum"], b["eval_after"])
    assert lines(run / "seeds.jsonl") == lines(reference / "seeds.jsonl")


# -- 1. nothing in a run directory executes code -------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_optimizer_file_is_refused_and_runs_no_code(cli, reference, tmp_path):
    run = copy_run_until(reference, 8, tmp_path / "run")
    marker = tmp_path / "code-ran"
    target = run / "checkpoints" / "step-00000008"
    with open(target / "optimizer-rank0.pt", "wb") as f:
        pickle.dump({"optimizer": "mezo", "payload": _RunsCode(marker)}, f, protocol=2)
    rewrite_manifest(target)
    error = one_line_error(cli("train", "--resume", run, "--steps", 12))
    assert "optimizer-rank0.pt" in error and "could run code" in error
    assert not marker.exists()


def test_the_latest_pointer_never_leads_outside_the_run(cli, reference, tmp_path):
    run = copy_run_until(reference, 8, tmp_path / "run")
    (run / "checkpoints" / "latest").write_text(f"../../{reference.name}/checkpoints/step-00000008\n")
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    done = cli("train", "--resume", run, "--steps", 12)
    assert done.returncode == 0 and "at step 4 (step-00000004)" in done.stdout, done.stderr[-2000:]
    assert_same_trajectory(run, reference)
    for path in (run / "checkpoints").glob("step-*"):
        shutil.rmtree(path)
    (run / "checkpoints" / "latest").write_text(str(reference / "checkpoints" / "step-00000008") + "\n")
    assert "has no complete checkpoint" in one_line_error(cli("train", "--resume", run, "--steps", 20))


@pytest.mark.parametrize("planted", ["summary.json", ".lock", "checkpoints/.latest.tmp", "checkpoints/step-00000012"])
def test_nothing_is_written_through_a_link_planted_in_a_run(cli, planted, reference, tmp_path):
    """A run directory holding a symbolic link is refused in one line, and the file it points at
    outside the run is left as it was."""
    run = copy_run_until(reference, 8, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    (run / planted).unlink(missing_ok=True)
    (run / planted).symlink_to(outside)
    error = one_line_error(cli("train", "--resume", run, "--steps", 12))
    assert f"{planted} is a symbolic link" in error and outside.read_text() == "precious\n"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".lock").symlink_to(outside)  # a new run's --out with a planted lock
    assert ".lock is a symbolic link" in one_line_error(cli("train", "--out", fresh, *SMALL))
    assert outside.read_text() == "precious\n"


def test_a_single_process_sharded_run_listens_on_loopback_only():
    script = ("import json, psutil, zoscale.backends as b\n"
              "backend = b.get('fsdp'); backend.setup(60)\n"
              "print(json.dumps(sorted({c.laddr.ip for c in psutil.Process().net_connections('inet')\n"
              "                         if c.status == 'LISTEN'})))\n"
              "backend.teardown()\n")
    done = run_group([sys.executable, "-c", script], timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    listening = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(ip in ("127.0.0.1", "::1") for ip in listening), listening  # gloo's own pair socket is loopback


# -- 2. one writer per run directory; no orphans -------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(cli, tmp_path):
    run = tmp_path / "run"
    with RunDirectory(run, fresh=True):  # flock: a second open file in the same process is refused too
        error = one_line_error(cli("train", "--out", run, *SMALL, "steps=2"))
        assert f"in use by another zoscale run (pid {os.getpid()})" in error
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    # a holder killed with -9 leaves the lock file, not the lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from zoscale.train.rundir import RunDirectory; RunDirectory(Path(sys.argv[1]), True)."
                               "__enter__(); print('held', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    done = cli("train", "--out", run, *SMALL, "steps=2")
    assert done.returncode == 0, done.stderr[-2000:]


def test_workers_exit_when_their_launcher_is_killed(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zoscale",
           "train", "--out", str(run), "backend=ddp", "steps=100000", "save_every=0", *SMALL]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        wait_for_lines(metrics, 5, proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "zoscale" in " ".join(p.cmdline())]
        assert len(workers) == 2
        proc.kill()  # the launcher agent, kill -9: nothing forwards a signal to the workers
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, "orphaned workers went on training"
        logged = len(metrics.read_text().splitlines())
        time.sleep(1.5)
        assert len(metrics.read_text().splitlines()) == logged and not (run / "checkpoints").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


# -- 3. no checkpoint lost while being replaced; no finished run rewritten ------------------------------
def test_saving_a_step_again_keeps_the_complete_checkpoint(tmp_path):
    t = Trainer(load(QUICKSTART, [*SMALL, "steps=4"]), tmp_path / "run")
    for step in range(2):
        t.train_step(t.batch(step))
    t.step = 2
    t.save()
    first = t.last_checkpoint
    inode = (first / "shards-rank0.safetensors").stat().st_ino
    t.save()  # the same step again: the live checkpoint is never deleted to make room
    assert (first / "shards-rank0.safetensors").stat().st_ino == inode
    (first / "shards-rank0.safetensors").write_bytes(b"torn")  # an incomplete leftover is replaced
    t.save()
    assert checkpoint.find(tmp_path / "run" / "checkpoints").path == first
    assert not list((tmp_path / "run" / "checkpoints").glob(".*-step-*"))


def test_resume_to_a_step_already_reached_changes_nothing(cli, reference):
    before = {name: (reference / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "seeds.jsonl")}
    for steps in (12, 8):
        error = one_line_error(cli("train", "--resume", reference, "--steps", steps))
        assert "is at step 12 already" in error
    assert before == {name: (reference / name).read_bytes() for name in before}


# -- 4. resume survives the damage it can survive -------------------------------------------------------
def test_resume_drops_a_torn_last_log_line(cli, reference, tmp_path):
    run = copy_run_until(reference, 8, tmp_path / "run")
    for name in ("metrics.jsonl", "seeds.jsonl"):
        with open(run / name, "a") as f:
            f.write('{"step": 8, "loss": 0.6')  # a kill or a full disk mid-append
    done = cli("train", "--resume", run, "--steps", 12)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dropped a torn last line" in done.stdout
    assert_same_trajectory(run, reference)


def test_a_damaged_middle_log_line_is_a_one_line_error(cli, reference, tmp_path):
    run = copy_run_until(reference, 8, tmp_path / "run")
    text = (run / "seeds.jsonl").read_text().splitlines()
    text[2] = text[2][:10]
    (run / "seeds.jsonl").write_text("\n".join(text) + "\n")
    assert "seeds.jsonl line 3 is not valid JSON" in one_line_error(cli("train", "--resume", run, "--steps", 12))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no-manifest", "missing-file", "garbage-rehashed"])
def test_resume_skips_a_damaged_newest_checkpoint_for_a_complete_older_one(cli, damage, reference, tmp_path):
    run = copy_run_until(reference, 8, tmp_path / "run")
    newest = run / "checkpoints" / "step-00000008"
    shards = newest / "shards-rank0.safetensors"
    if damage == "truncated":
        shards.write_bytes(shards.read_bytes()[:100])
    elif damage == "flipped":
        data = bytearray(shards.read_bytes())
        data[-5] ^= 0xFF
        shards.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (newest / MANIFEST).unlink()
    elif damage == "garbage-rehashed":  # garbage under a manifest rewritten to match it
        shards.write_bytes(bytes(range(256)) * 8)
        rewrite_manifest(newest)
    else:
        (newest / "optimizer-rank0.pt").unlink()
    (run / "checkpoints" / "latest").write_text("")  # an empty pointer changes nothing either
    done = cli("train", "--resume", run, "--steps", 12)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped step-00000008" in done.stdout and "at step 4 (step-00000004)" in done.stdout
    assert_same_trajectory(run, reference)


def test_a_missing_best_checkpoint_does_not_crash_the_end_of_training(tmp_path):
    t = Trainer(load(QUICKSTART, [*SMALL, "steps=3"]), tmp_path / "run")
    t.train_step(t.batch(0))
    t.step = 1
    t._dev_eval()  # best/ at step 1
    shutil.rmtree(tmp_path / "run" / "best")
    for step in range(1, 3):
        t.train_step(t.batch(step))
    t.step = 3
    t.save()
    summary = t._finish(0.0)
    assert summary["best_dev"]["step"] == 1 and summary["eval_after"] == summary["eval_final"]


# -- 5. preemption ----------------------------------------------------------------------------------------
def interrupt(cmd: list[str], run: Path, after_lines: int = 5, sig=signal.SIGTERM, env=None) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_lines(run / "metrics.jsonl", after_lines, proc)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
        return proc.returncode, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_writes_a_checkpoint_and_resume_continues_the_trajectory(cli, sig, reference, tmp_path):
    run = tmp_path / "run"
    code, output = interrupt([sys.executable, "-m", "zoscale", "train", "--out", str(run), "steps=12",
                              "save_every=4", *SMALL], run, after_lines=2, sig=sig)
    assert code == EXIT_PREEMPTED, output[-2000:]
    stopped = lines(run / "metrics.jsonl")[-1]["step"] + 1
    assert 2 <= stopped < 12 and checkpoint.latest(run / "checkpoints").name == f"step-{stopped:08d}"
    assert "continue with: zoscale train --resume" in output
    done = cli("train", "--resume", run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_trajectory(run, reference)


def test_torchrun_ranks_stop_together_on_sigterm_and_resume(reference, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zoscale",
           "train", "--out", str(run), "backend=ddp", "steps=12", "save_every=4", *SMALL]
    code, output = interrupt(cmd, run, after_lines=2)
    assert code != 0
    stopped = lines(run / "metrics.jsonl")[-1]["step"] + 1
    saved = checkpoint.latest(run / "checkpoints")
    assert saved.name == f"step-{stopped:08d}", output[-3000:]
    assert json.loads((saved / "trainer.json").read_text())["world_size"] == 2
    done = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                      "zoscale", "train", "--resume", str(run)], timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    a, b = json.loads((run / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    assert a["param_sq_sum"] == pytest.approx(b["param_sq_sum"], rel=1e-6)


def test_auto_resume_starts_continues_and_then_does_nothing(cli, reference, tmp_path):
    run = copy_run_until(reference, 8, tmp_path / "run")
    done = cli("train", "--auto-resume", "--out", run, "steps=12", "save_every=4", *SMALL)
    assert done.returncode == 0 and "at step 8" in done.stdout, done.stderr[-2000:]
    assert_same_trajectory(run, reference)
    again = cli("train", "--auto-resume", "--out", run, "steps=12", "save_every=4", *SMALL)
    assert again.returncode == 0 and "complete at step 12; nothing to do" in again.stdout
    other = cli("train", "--auto-resume", "--out", run, "steps=16", "optim.lr=1e-2", *SMALL)
    assert "another optim" in one_line_error(other)


# -- 6. divergence ----------------------------------------------------------------------------------------
def test_an_infinite_learning_rate_stops_the_run_and_saves_nothing_non_finite(cli, tmp_path):
    run = tmp_path / "run"
    error = one_line_error(cli("train", "--out", run, "steps=6", "save_every=2", "optim.lr=.inf", *SMALL), code=1)
    assert "non-finite coefficient" in error and "no checkpoint had been written" in error
    assert not (run / "summary.json").exists() and checkpoint.latest(run / "checkpoints") is None


def test_parameters_that_overflow_are_caught_and_the_last_checkpoint_restored(tmp_path, monkeypatch):
    t = Trainer(load(QUICKSTART, [*SMALL, "steps=20", "save_every=2"]), tmp_path / "run")
    real = t.optimizer.lr_at
    # from step 3 a coefficient that is finite in float64 but overflows the fp32 parameters
    monkeypatch.setattr(t.optimizer, "lr_at", lambda step: real(step) if step < 3 else 1e300)
    with pytest.raises(NonFiniteLossError, match="step-00000002, holds finite parameters and is restored"):
        t.run()
    saved = checkpoint.whole_params(checkpoint.latest(tmp_path / "run" / "checkpoints"))
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == "step-00000002"
    for shard in t.optimizer.shards:
        assert torch.equal(shard.tensor.reshape(-1), saved[shard.name])


# -- 7. launcher mistakes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 must be in [0, 2)"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1 must be in [0, 2)"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     "MASTER_PORT=99999 must be in [1, 65536)"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}, "backend fsdp: WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT"),
])
def test_launcher_mistakes_are_fast_one_line_errors(cli, env, message, tmp_path, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    start = time.time()
    done = cli("train", "--out", tmp_path / "run", "backend=fsdp", *SMALL)
    assert message in one_line_error(done)
    assert time.time() - start < 30 and not (tmp_path / "run").exists()


# -- 8. bad input: one line naming the file and line or the key, exit 2, before any model is built --------
DATA = Path(QUICKSTART).parent / "sst2"


def data_with(tmp_path: Path, line: int, text: bytes | None) -> str:
    """The quickstart's data with line ``line`` of train.jsonl replaced (None: the file emptied)."""
    shutil.copytree(DATA, tmp_path / "data")
    train = tmp_path / "data" / "train.jsonl"
    rows = train.read_bytes().splitlines(keepends=True)
    train.write_bytes(b"" if text is None else b"".join(rows[:line - 1] + [text + b"\n"] + rows[line:]))
    return f"data.path={tmp_path / 'data'}"


@pytest.mark.parametrize("case", ["malformed-json", "empty-file", "not-utf8", "label-outside", "negative-layers",
                                  "unknown-model-type", "missing-tokenizer", "batch-too-large", "lr-not-a-number",
                                  "boolean-eps", "boolean-steps", "out-under-a-file"])
def test_bad_input_is_one_line_naming_the_place_and_exit_2(case, tmp_path, capsys):
    from zoscale.cli import main

    out = tmp_path / "run"
    overrides, expected = {
        "malformed-json": (lambda: [data_with(tmp_path, 3, b'{"sentence": "fine", "label": 1')],
                           "train.jsonl line 3 is not valid JSON"),
        "empty-file": (lambda: [data_with(tmp_path, 1, None)], "train.jsonl is empty"),
        "not-utf8": (lambda: [data_with(tmp_path, 5, b'{"sentence": "caf\xe9", "label": 1}')],
                     "train.jsonl line 5 is not UTF-8"),
        "label-outside": (lambda: ["data.num_train=2000", data_with(tmp_path, 7, b'{"sentence": "odd", "label": 7}')],
                          "has label 7, but task sst2 has 2 classes"),
        "negative-layers": (lambda: ["model.config.num_hidden_layers=-2"],
                            "model.config.num_hidden_layers: must be a positive integer, got -2"),
        "unknown-model-type": (lambda: ["model.config.model_type=gpt9"], "model.config: "),
        "missing-tokenizer": (lambda: [f"model.tokenizer={tmp_path / 'no-tokenizer'}"],
                              "model.tokenizer: no such directory"),
        "batch-too-large": (lambda: ["batch_size=1000000000"], "batch_size: 1000000000 exceeds the training sample"),
        "lr-not-a-number": (lambda: ["optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
        "boolean-eps": (lambda: ["optim.eps=true"], "optim.eps: expected a number, got True"),
        "boolean-steps": (lambda: ["steps=true"], "steps: expected a number, got True"),
        "out-under-a-file": (lambda: [], "cannot create it"),
    }[case]
    if case == "out-under-a-file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
    code = main(["train", "--out", str(out), *SMALL, *overrides()])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-made that would block a retry


@pytest.mark.parametrize("edit,key", [("optim.lr", "optim"), ("seed", "seed")])
def test_resume_after_the_config_was_edited_is_refused(edit, key, reference, tmp_path, capsys):
    import yaml

    from zoscale.cli import main

    run = copy_run_until(reference, 8, tmp_path / "run")
    raw = yaml.safe_load((run / "config.yaml").read_text())
    if edit == "seed":
        raw["seed"] = 5
    else:
        raw["optim"]["lr"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    code = main(["train", "--resume", str(run), "--steps", "12"])
    err = capsys.readouterr().err
    assert code == 2 and f"--resume: {key} in" in err and "restore it, or start a new run" in err, err
    assert len(err.strip().splitlines()) == 1


# -- 9. fault injection: SIGKILL at every few file operations of a checkpoint commit ------------------------
def test_a_kill_anywhere_in_a_checkpoint_commit_resumes_on_the_same_trajectory(tmp_path):
    done = run_group([sys.executable, str(REPO / "tests" / "scripts" / "kill_during_commit.py"), str(tmp_path), "2"],
                     timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["reference_exit"] == 0 and results["operations"] >= 10
    assert len(results["runs"]) >= 5
    for n, run in results["runs"].items():
        assert run["first_exit"] == -signal.SIGKILL, f"operation {n}: the run was not killed"
        assert run["resume_exit"] == 0, f"operation {n}: resume failed ({(tmp_path / 'log.txt').read_text()[-2000:]})"
        assert run["summary"]["param_sum"] == results["summary"]["param_sum"], f"operation {n}"
        assert run["seeds"] == results["seeds"], f"operation {n}"
