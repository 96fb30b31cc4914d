"""Pretrained weights from a local directory load into sharded models rank by rank (FSDP2: each
rank reads its rows from the safetensors files; ZeRO-3: from_pretrained under HfDeepSpeedConfig;
ZeRO-3 in shard groups: each rank reads its partitions), and training continues exactly as from a
whole model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import launch

RUN = ["steps=6", "eval_every=0", "save_every=0", "data.num_train=48", "data.num_dev=4", "data.num_test=30",
       "batch_size=12"]


@pytest.fixture(scope="module", params=["opt", "llama"])
def pretrained(request, tmp_path_factory):
    """A save_pretrained directory (model and tokenizer) of a tiny OPT, or of a tiny Llama, whose
    rotary tables are buffers that meta-device loading must recompute."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from zoscale.quickstart import QUICKSTART

    out = tmp_path_factory.mktemp("pretrained") / f"{request.param}-tiny"
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART.parent / "tokenizer")
    torch.manual_seed(3)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if request.param == "opt":
        model = OPTForCausalLM(OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=64, num_key_value_heads=2))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return ["model.config=null", f"model.name_or_path={out}", f"model.tokenizer={out}"]


def first_losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()[:3]]


@pytest.fixture(scope="module")
def local(pretrained, tmp_path_factory):
    run = tmp_path_factory.mktemp("local") / "run"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(run), *RUN, *pretrained],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.parametrize("backend,world,message", [("fsdp", 3, "sharded loading"),
                                                   ("deepspeed", 2, "ZeRO-3 partitions")])
def test_sharded_loading_continues_like_a_whole_model(backend, world, message, pretrained, local, tmp_path):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    continues_like_the_whole_model([f"backend={backend}"], world, message, pretrained, local, tmp_path)


@pytest.mark.parametrize("pretrained", ["opt"], indirect=True)  # the partition reader is the same for any model
def test_zero3_in_shard_groups_reads_each_ranks_partitions(pretrained, local, tmp_path):
    """ZeRO-3 in 2 groups of 2: each rank reads its partitions of its group from the files."""
    pytest.importorskip("deepspeed")
    continues_like_the_whole_model(["backend=deepspeed", "zero3_shard_size=2"], 4, "partitions of each shard",
                                   pretrained, local, tmp_path)


def continues_like_the_whole_model(layout: list[str], world: int, message: str, pretrained, local, tmp_path):
    run = tmp_path / "run"
    done = launch(world, "-m", "zoscale", "train", "--out", str(run), *layout, *RUN, *pretrained, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    assert message in done.stdout
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, local))
    assert summary["eval_before"] == expected["eval_before"]
    assert first_losses(run) == pytest.approx(first_losses(local), abs=1e-5)  # weights and buffers arrived intact
    assert summary["param_sq_sum"] == pytest.approx(expected["param_sq_sum"], rel=1e-6)


def test_a_hub_id_loads_sharded_from_its_snapshot(pretrained, local, tmp_path):
    """A hub id resolves to its snapshot in the Hugging Face cache (here made by hand, offline: the
    layout huggingface_hub writes), and FSDP2 reads each rank's rows from it."""
    import shutil

    source = Path(pretrained[1].split("=", 1)[1])
    repo = tmp_path / "hub" / "models--zoscale-test--tiny"
    shutil.copytree(source, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    run = tmp_path / "run"
    done = launch(2, "-m", "zoscale", "train", "--out", str(run), "backend=fsdp", *RUN, "model.config=null",
                  "model.name_or_path=zoscale-test/tiny", timeout=400,
                  env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:]
    assert "sharded loading" in done.stdout and "0123abcd" in done.stdout
    assert first_losses(run) == pytest.approx(first_losses(local), abs=1e-5)


def test_export_streams_the_pretrained_files_with_the_trained_parameters(pretrained, tmp_path):
    """`zoscale export` of a run from pretrained safetensors rewrites them file by file: the trained
    parameters from the checkpoint, the others as they were."""
    import torch
    from transformers import AutoModelForCausalLM

    from zoscale.train import checkpoint

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(run), *RUN, *pretrained,
                           r"model.trainable=layers\.0\."], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "zoscale", "export", str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "one file at a time" in done.stdout
    source = Path(pretrained[1].split("=", 1)[1])
    assert {f.name for f in out.glob("*.safetensors")} == {f.name for f in source.glob("*.safetensors")}
    trained = checkpoint.whole_params(checkpoint.latest(run / "checkpoints"))
    original = dict(AutoModelForCausalLM.from_pretrained(source).named_parameters())
    exported = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    assert trained and set(trained) < set(exported)
    for name, p in exported.items():
        if name in trained:
            assert torch.equal(p.detach().flatten(), trained[name]) and not torch.equal(p, original[name]), name
        else:
            assert torch.equal(p, original[name]), name

