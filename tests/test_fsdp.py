"""backend=fsdp (FSDP2 over gloo): uneven row shards give the single-process trajectory, and a run
saved on 2 ranks resumes on 3."""

import json
import subprocess
import sys

import pytest
import torch
from distributed import launch
from safetensors.torch import load_file

from zoscale.train import checkpoint

RUN = ["steps=12", "eval_every=6", "save_every=6", "data.num_train=96", "data.num_dev=24", "data.num_test=30",
       "batch_size=12", "eval_batch_size=8"]


def optim(name: str) -> list[str]:
    # ConMeZO with a float32 momentum: a bf16 one rounds the ranks' loss-sum orders into the trajectory
    # (1.2e-6 relative after 12 steps on 3 ranks on some CPUs), which is not what these tests compare
    return [f"optim.name={name}", *(["optim.buffer_dtype=float32"] if name == "conmezo" else [])]


def summary(run):
    return json.loads((run / "summary.json").read_text())


def pgs(run):
    entries = [json.loads(line) for line in (run / "seeds.jsonl").read_text().splitlines()]
    return [e["projected_grads"][0] for e in entries if "step" in e]  # after the header


def same_trajectory(a, b):
    # the batch is split over ranks: only the order of the fp32 loss sums differs (pg noise ~1e-4)
    assert summary(b)["param_sq_sum"] == pytest.approx(summary(a)["param_sq_sum"], rel=1e-6)
    assert summary(b)["param_sum"] == pytest.approx(summary(a)["param_sum"], rel=1e-6)
    assert summary(b)["eval_after"] == summary(a)["eval_after"]
    assert pgs(b) == pytest.approx(pgs(a), rel=1e-3, abs=1e-3)


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    runs = {}
    for optimizer in ("mezo", "conmezo", "mezo_svrg", "pseuzo"):
        run = tmp_path_factory.mktemp("local") / optimizer
        done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(run), *RUN, *optim(optimizer)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs[optimizer] = run
    return runs


@pytest.mark.parametrize("world,optimizer", [(3, "mezo"), (2, "conmezo"), (3, "conmezo"), (3, "mezo_svrg"),
                                            (3, "pseuzo")])
def test_fsdp_ranks_follow_the_local_trajectory(world, optimizer, local_runs, tmp_path):
    run = tmp_path / "fsdp"
    done = launch(world, "-m", "zoscale", "train", "--out", str(run), "backend=fsdp", *RUN, *optim(optimizer),
                  timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    same_trajectory(local_runs[optimizer], run)


def test_a_run_saved_on_2_ranks_resumes_on_3(local_runs, tmp_path):
    run = tmp_path / "fsdp"
    first = launch(2, "-m", "zoscale", "train", "--out", str(run), "backend=fsdp",
                   *[o if o != "steps=12" else "steps=6" for o in RUN], *optim("conmezo"), timeout=300)
    assert first.returncode == 0, first.stdout[-3000:]
    saved = run / "checkpoints" / "step-00000006"
    pieces = [{k: t.numel() for k, t in load_file(saved / f"shards-rank{r}.safetensors").items()} for r in range(2)]
    numel = sum(t.numel() for t in checkpoint.whole_params(saved).values())
    for kind in ("param", "momentum"):  # each rank wrote its own rows of parameters and momentum, no more
        sizes = [sum(n for k, n in rank.items() if k.startswith(kind + "/")) for rank in pieces]
        assert sum(sizes) == numel and max(sizes) < 0.6 * numel
    second = launch(3, "-m", "zoscale", "train", "--resume", str(run), "--steps", "12", timeout=300)
    assert second.returncode == 0, second.stdout[-3000:]
    same_trajectory(local_runs["conmezo"], run)  # ConMeZO's sharded momentum was re-sliced for 3 ranks

    out = tmp_path / "hf"
    assert subprocess.run([sys.executable, "-m", "zoscale", "export", str(run), "--out", str(out)],
                          capture_output=True, timeout=300).returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    local = checkpoint.whole_params(local_runs["conmezo"] / "checkpoints" / "step-00000012")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().flatten(), local[name], rtol=1e-4, atol=1e-5)


def test_fp32_shards_with_bf16_compute(local_runs, tmp_path):
    """MixedPrecisionPolicy: perturbations go into fp32 shards; the forward computes in bf16."""
    run = tmp_path / "mp"
    done = launch(2, "-m", "zoscale", "train", "--out", str(run), "backend=fsdp", "fsdp_compute_dtype=bfloat16",
                  *RUN, "optim.name=mezo", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    params = checkpoint.whole_params(run / "checkpoints" / "step-00000012")
    assert all(t.dtype == torch.float32 for t in params.values())
    first = lambda r: json.loads((r / "metrics.jsonl").read_text().splitlines()[0])["loss"]  # noqa: E731
    assert first(run) == pytest.approx(first(local_runs["mezo"]), abs=2e-2)  # bf16 rounding of the forward
    offload = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(tmp_path / "o"),
                              "backend=fsdp", "fsdp_cpu_offload=true"], capture_output=True, text=True, timeout=120)
    assert offload.returncode == 2 and "fsdp_cpu_offload: needs CUDA" in offload.stderr


def test_random_weights_drawn_rank_by_rank_are_the_same_on_any_number_of_ranks(tmp_path):
    """`model.init_device: device`: each rank draws only its rows from the Philox stream, so 1 and
    3 ranks start from the same weights (lr=0 keeps them, to a few ulps of +eps, -2eps, +eps), and
    the draw has transformers' layout: zero biases, unit norm weights, N(0, 0.02^2)."""
    params = {}
    for world in (1, 3):
        run = tmp_path / f"w{world}"
        done = launch(world, "-m", "zoscale", "train", "--out", str(run), "backend=fsdp", "model.init_device=device",
                      "steps=2", "optim.lr=0", "eval_every=0", "save_every=0", "eval_before=false",
                      "data.num_dev=0", "data.num_test=0", timeout=300)
        assert done.returncode == 0, done.stdout[-3000:]
        assert "drew random weights in FSDP2 shards" in done.stdout
        params[world] = checkpoint.whole_params(run / "checkpoints" / "step-00000002")
    assert params[1].keys() == params[3].keys()
    for name, value in params[1].items():
        assert torch.equal(value, params[3][name]), name
        if name.endswith("bias"):
            assert value.abs().max() < 1e-6, name
        elif "layer_norm" in name:
            assert (value - 1).abs().max() < 1e-6, name
        else:
            assert abs(value.std().item() - 0.02) < 0.002 and abs(value.mean().item()) < 0.002, name
