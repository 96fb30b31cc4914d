"""Stream v2 as a run property: the sharded trajectories equal one process as on v1, and a run keeps
its stream through config.yaml, the seed log's header, checkpoints, resume and replay; a resumed run
keeps the run properties (stream, ConMeZO's momentum dtype) it began with when defaults change."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import yaml
from distributed import launch

from zoscale.engine import rng

RUN = ["steps=8", "eval_every=0", "save_every=4", "data.num_train=96", "data.num_dev=0", "data.num_test=30",
       "batch_size=12", "eval_batch_size=8", "optim.stream=v2"]


def train(*args):
    return subprocess.run([sys.executable, "-m", "zoscale", "train", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("v2") / "local"
    done = train("--out", run, *RUN)
    assert done.returncode == 0, done.stderr
    return run


def test_a_v2_run_records_its_stream(local_run):
    assert yaml.safe_load((local_run / "config.yaml").read_text())["optim"]["stream"] == "v2"
    header = json.loads((local_run / "seeds.jsonl").read_text().splitlines()[0])
    assert header == {"header": {"stream": "v2", "distribution": "gaussian"}}
    state = torch.load(next((local_run / "checkpoints").glob("step-*/optimizer-rank0.pt")), weights_only=True)
    assert state["config"]["stream"] == "v2"


@pytest.mark.parametrize("world,backend", [(3, "fsdp"), (2, "deepspeed")])
def test_sharded_v2_runs_follow_the_local_trajectory(world, backend, local_run, tmp_path):
    run = tmp_path / backend
    done = launch(world, "-m", "zoscale", "train", "--out", str(run), f"backend={backend}", *RUN, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert summary(run)["param_sq_sum"] == pytest.approx(summary(local_run)["param_sq_sum"], rel=1e-6)
    assert summary(run)["eval_after"] == summary(local_run)["eval_after"]


def test_a_run_keeps_its_stream(local_run, tmp_path, cli):
    """--auto-resume with another stream is refused; replay refuses a config whose stream differs
    from the seed log's, and otherwise rebuilds the v2 run."""
    other = cli("train", "--out", local_run, "--auto-resume", *[a for a in RUN if a != "optim.stream=v2"],
                "steps=12")
    assert other.returncode == 2 and "another optim" in other.stderr, other.stderr
    replayed = cli("replay", local_run, "--out", tmp_path / "replayed")
    assert replayed.returncode == 0, replayed.stderr
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(local_run), str(copy)], check=True)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["optim"]["stream"] = "v1"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    refused = cli("replay", copy, "--out", tmp_path / "refused")
    assert refused.returncode == 2 and "perturbation stream v2" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists()


def test_optimizer_state_of_another_stream_is_refused():
    import zoscale

    model = torch.nn.Linear(4, 3)
    saved = zoscale.build_optimizer("mezo", model, stream="v2").state_dict()
    with pytest.raises(ValueError, match="saved with stream v2, this run uses v1"):
        zoscale.build_optimizer("mezo", model).load_state_dict(saved)
    momentum = zoscale.build_optimizer("conmezo", model, buffer_dtype="float32").state_dict()
    with pytest.raises(ValueError, match=r"buffer_dtype float32, this run uses bfloat16: .*buffer_dtype='float32'"):
        zoscale.build_optimizer("conmezo", model).load_state_dict(momentum)
    with pytest.raises(ValueError, match="stream: must be one of"):
        zoscale.build_optimizer("mezo", model, stream="v3")
    assert rng.STREAMS == ("v1", "v2")


def test_a_resumed_run_keeps_the_momentum_dtype_it_began_with(tmp_path, cli):
    """ConMeZO's momentum became bfloat16 by default on 2026-12-03: a run begun with float32 that
    never named it (its config.yaml and checkpoint say nothing of it) resumes in float32, on the
    trajectory it would have taken uninterrupted."""
    run, reference = tmp_path / "old", tmp_path / "reference"
    base = [a for a in RUN if a != "optim.stream=v2"] + ["optim.name=conmezo", "optim.buffer_dtype=float32"]
    for out, steps in ((reference, 8), (run, 4)):
        done = cli("train", "--out", out, *base, f"steps={steps}")
        assert done.returncode == 0, done.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["optim"]["buffer_dtype"]  # as a run of 2026-12-02 wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    state = next((run / "checkpoints").glob("step-*/trainer.json"))
    trainer = json.loads(state.read_text())
    del trainer["config"]["optim"]["buffer_dtype"]
    state.write_text(json.dumps(trainer))
    manifest = json.loads((state.parent / "manifest.json").read_text())  # the edit, checksummed as a save would
    manifest["files"]["trainer.json"] = {"bytes": state.stat().st_size,
                                         "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
    (state.parent / "manifest.json").write_text(json.dumps(manifest))
    resumed = cli("train", "--resume", run, "--steps", 8)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(run)["param_sq_sum"] == summary(reference)["param_sq_sum"]
