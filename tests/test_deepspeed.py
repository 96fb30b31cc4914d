"""backend=deepspeed (ZeRO-3 over gloo on CPU): flat partitions give the single-process trajectory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import free_port, launch, run_group

pytest.importorskip("deepspeed")

RUN = ["steps=8", "eval_every=4", "save_every=4", "data.num_train=96", "data.num_dev=24", "data.num_test=30",
       "batch_size=12", "eval_batch_size=8"]


def summary(run):
    return json.loads((run / "summary.json").read_text())


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


# 2 ranks with MeZO: test_zero3_gathers_a_layer_at_a_time_and_dual_forward_gathers_it_once
@pytest.mark.parametrize("world,optimizer,offload", [(3, "conmezo", False), (2, "conmezo", True)])
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


def test_zero3_gathers_a_layer_at_a_time_and_dual_forward_gathers_it_once(tmp_path):
    """Decoder layers are ZeRO-3 leaf modules: a forward of the quickstart's 2 layers issues at most
    layers + 4 all-gathers (the embeddings, the final norm and the head besides), and dual_forward
    half as many per step as two forwards, on the single-process trajectory."""
    common = ["steps=4", "eval_every=0", "save_every=0", "eval_before=false", "data.num_train=64",
              "data.num_dev=16", "data.num_test=16", "batch_size=8", "eval_batch_size=8"]
    script = str(Path(__file__).resolve().parent / "scripts" / "train_runs.py")
    done = run_group([sys.executable, script, str(tmp_path), json.dumps([["local", common, False]])], timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    plan = [[name, [*common, "backend=deepspeed", *extra], False]
            for name, extra in (("two", []), ("dual", ["dual_forward=true"]))]
    done = launch(2, script, str(tmp_path), json.dumps(plan), timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    gathers, local = {}, summary(tmp_path / "local")
    for name in ("two", "dual"):
        assert summary(tmp_path / name)["param_sum"] == pytest.approx(local["param_sum"], rel=1e-6)
        gathers[name] = json.loads((tmp_path / name / "comm.json").read_text())["1"]["world"]["all_gather"]
    layers = 2
    assert gathers["two"]["calls"] <= 2 * (layers + 4)  # two forwards
    assert 2 * gathers["dual"]["calls"] == gathers["two"]["calls"]
    assert 2 * gathers["dual"]["bytes"] == gathers["two"]["bytes"]


def test_the_shipped_zero3_config_is_the_generated_one():
    """It is written for the Trainer too ("auto" values); zoscale resolves them by the model's dtype."""
    import torch

    from zoscale.backends.deepspeed import resolve_auto, zero3_config

    shipped = json.loads((CONFIGS / "zero3.json").read_text())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_auto(shipped, dtype) == zero3_config(dtype)


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

    import torch
    from transformers import AutoModelForCausalLM

    from zoscale.train import checkpoint

    local = tmp_path / "local"
    assert subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(local), *RUN],
                          capture_output=True, timeout=300).returncode == 0
    run = tmp_path / "ds"
    env = {"NPROC": "2", "MASTER_PORT": str(free_port()), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
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


def async_io_available() -> str | None:
    """None when DeepSpeed's async_io op can build (it needs libaio; Debian's is installed if
    missing), else why not."""
    probe = [sys.executable, "-c", "from deepspeed.ops.op_builder import AsyncIOBuilder as B; "
             "raise SystemExit(0 if B().is_compatible(verbose=False) else 1)"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    install = subprocess.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends libaio-dev",
                             shell=True, capture_output=True, timeout=600)
    if install.returncode != 0:
        return f"could not install libaio-dev: {install.stderr.decode()[-300:]}"
    return None if subprocess.run(probe, capture_output=True).returncode == 0 else "async_io still incompatible"


@pytest.fixture(scope="session")
def async_io_op():
    """DeepSpeed's async_io op, built (JIT, cached in ~/.cache/torch_extensions) before any ranks start:
    a build inside a timed 2-rank run left rank 1 waiting in gloo's group creation until it broke."""
    reason = async_io_available()
    if reason:
        pytest.skip(reason)
    build = subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder import AsyncIOBuilder; "
                            "AsyncIOBuilder().load(verbose=False)"], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """An OPT whose largest partitions on 2 ranks reach the 1 MiB that DeepSpeed swaps to NVMe."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from zoscale.quickstart import QUICKSTART

    out = tmp_path_factory.mktemp("wide") / "opt-wide"
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART.parent / "tokenizer")
    torch.manual_seed(5)
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=2, ffn_dim=2048,
                             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=256,
                             pad_token_id=0, bos_token_id=1, eos_token_id=1, dropout=0.0)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return ["model.config=null", f"model.name_or_path={out}", f"model.tokenizer={out}"]


@pytest.mark.slow  # building the async_io op takes minutes on 2 cores: `python -m pytest -m slow`
def test_nvme_offload_follows_the_in_memory_trajectory_and_resumes(async_io_op, wide_model, tmp_path):
    """offload_param nvme with real swapping (a few small buffers, nothing kept in host memory):
    the engine reads partitions in, writes them and writes them back, so ConMeZO on 2 ranks is
    exactly the in-memory ZeRO-3 run, through a checkpoint and a resume (its projected cone takes
    <m, z> and |z|^2, the latter from the placeholders' sizes alone)."""
    config = json.loads((CONFIGS / "zero3_offload_nvme.json").read_text())
    assert config["zero_optimization"]["offload_param"]["device"] == "nvme"
    config["bf16"]["enabled"] = False  # only the dtype and the sizes change
    config["zero_optimization"]["offload_param"].update(nvme_path=str(tmp_path / "nvme"), max_in_cpu=0,
                                                        buffer_count=4, buffer_size=300_000)
    (tmp_path / "nvme.json").write_text(json.dumps(config))
    args = [*wide_model, "optim.name=conmezo", "optim.noise=projected", "steps=6", "save_every=3", "eval_every=3",
            "data.num_train=48", "data.num_dev=8", "data.num_test=16", "batch_size=12"]
    memory = tmp_path / "memory"
    done = launch(2, "-m", "zoscale", "train", "--out", str(memory), "backend=deepspeed", *args, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    nvme = tmp_path / "nvme-run"
    first = launch(2, "-m", "zoscale", "train", "--out", str(nvme), "backend=deepspeed",
                   f"deepspeed_config={tmp_path / 'nvme.json'}", *[a if a != "steps=6" else "steps=3" for a in args],
                   timeout=600)
    assert first.returncode == 0, first.stdout[-3000:]
    assert len(list((tmp_path / "nvme").rglob("*.swp"))) >= 4  # partitions really lived on the drive
    assert list((nvme / "checkpoints" / "step-00000003").glob("shards-rank1-part*.safetensors"))  # a batch a file
    second = launch(2, "-m", "zoscale", "train", "--resume", str(nvme), "--steps", "6", timeout=400)
    assert second.returncode == 0, second.stdout[-3000:]
    a, b = summary(memory), summary(nvme)
    assert b["param_sq_sum"] == pytest.approx(a["param_sq_sum"], rel=1e-12)
    assert b["param_sum"] == pytest.approx(a["param_sum"], rel=1e-12)
    assert b["eval_after"] == a["eval_after"]
