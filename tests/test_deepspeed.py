"""backend=deepspeed (ZeRO-3 over gloo on CPU): flat partitions give the single-process trajectory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import launch, run_group

pytest.importorskip("deepspeed")

RUN = ["steps=8", "eval_every=4", "save_every=4", "data.num_train=96", "data.num_dev=24", "data.num_test=30",
       "batch_size=12", "eval_batch_size=8"]


def summary(run):
    return json.loads((run / "summary.json").read_text())


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


@pytest.mark.parametrize("world,optimizer,offload", [(2, "mezo", False), (3, "conmezo", False), (2, "conmezo", True)])
def test_zero3_ranks_follow_the_local_trajectory(world, optimizer, offload, tmp_path):
    local = tmp_path / "local"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(local), *RUN,
                           f"optim.name={optimizer}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    extra = []
    if offload:  # the shipped offload_param: cpu config, with only the dtype changed (fp32 on CPU)
        config = json.loads((CONFIGS / "zero3_offload.json").read_text())
        assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
        config["bf16"]["enabled"] = False
        (tmp_path / "offload.json").write_text(json.dumps(config))
        extra = [f"deepspeed_config={tmp_path / 'offload.json'}"]
    run = tmp_path / "zero3"
    done = launch(world, "-m", "zoscale", "train", "--out", str(run), "backend=deepspeed", *RUN,
                  f"optim.name={optimizer}", *extra, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    a, b = summary(local), summary(run)
    assert b["param_sq_sum"] == pytest.approx(a["param_sq_sum"], rel=1e-6)
    assert b["param_sum"] == pytest.approx(a["param_sum"], rel=1e-6)
    assert b["eval_after"] == a["eval_after"]


def test_the_shipped_zero3_config_is_the_generated_one():
    import torch

    from zoscale.backends.deepspeed import zero3_config

    shipped = json.loads((CONFIGS / "zero3.json").read_text())
    assert shipped == zero3_config(torch.float32)


def test_a_fsdp_run_on_2_ranks_resumes_under_zero3_on_3(tmp_path):
    local = tmp_path / "local"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(local), *RUN,
                           "optim.name=conmezo"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "moved"
    first = launch(2, "-m", "zoscale", "train", "--out", str(run), "backend=fsdp",
                   *[o if o != "steps=8" else "steps=4" for o in RUN], "optim.name=conmezo", timeout=300)
    assert first.returncode == 0, first.stdout[-3000:]
    second = launch(3, "-m", "zoscale", "train", "--resume", str(run), "--steps", "8", "--backend", "deepspeed",
                    timeout=400)
    assert second.returncode == 0, second.stdout[-3000:]
    a, b = summary(local), summary(run)
    assert b["param_sq_sum"] == pytest.approx(a["param_sq_sum"], rel=1e-6)
    assert b["eval_after"] == a["eval_after"]


def test_the_deepspeed_launch_script_and_export(tmp_path):
    import os
    import socket

    import torch
    from transformers import AutoModelForCausalLM

    from zoscale import checkpoint

    local = tmp_path / "local"
    assert subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(local), *RUN],
                          capture_output=True, timeout=300).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ds"
    env = {"NPROC": "2", "MASTER_PORT": str(port), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = Path(__file__).resolve().parents[1] / "launch" / "deepspeed.sh"
    done = run_group(["bash", str(script), "--out", str(run), *RUN], env=env, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    assert summary(run)["param_sq_sum"] == pytest.approx(summary(local)["param_sq_sum"], rel=1e-6)

    out = tmp_path / "hf"
    assert subprocess.run([sys.executable, "-m", "zoscale", "export", str(run), "--out", str(out)],
                          capture_output=True, timeout=300).returncode == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    reference = checkpoint.whole_params(local / "checkpoints" / "step-00000008")
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p.detach().flatten(), reference[name], rtol=1e-4, atol=1e-5)


def test_nvme_offload_is_refused_before_any_work(tmp_path):
    config = json.loads((CONFIGS / "zero3_offload.json").read_text())
    config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(tmp_path)}
    (tmp_path / "nvme.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(tmp_path / "run"),
                           "backend=deepspeed", f"deepspeed_config={tmp_path / 'nvme.json'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "offload_param to nvme is not supported" in done.stderr and not (tmp_path / "run").exists()


def test_random_weights_drawn_partitioned_are_the_same_on_any_number_of_ranks(tmp_path):
    """model.init_device=device under ZeRO-3: a config's weights are drawn inside zero.Init (no rank
    holds the whole model). They are not the CPU's, but they do not depend on the world size."""
    runs = {}
    for world in (2, 3):
        runs[world] = tmp_path / f"w{world}"
        done = launch(world, "-m", "zoscale", "train", "--out", str(runs[world]), "backend=deepspeed", *RUN,
                      "model.init_device=device", timeout=400)
        assert done.returncode == 0, done.stdout[-3000:]
        assert "built random weights in ZeRO-3 partitions" in done.stdout
    a, b = summary(runs[2]), summary(runs[3])
    assert b["param_sq_sum"] == pytest.approx(a["param_sq_sum"], rel=1e-6)
    assert b["eval_before"] == a["eval_before"] and b["eval_after"] == a["eval_after"]
