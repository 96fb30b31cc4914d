"""Pretrained weights from a local directory load into sharded models rank by rank (FSDP2: each
rank reads its rows from the safetensors files; ZeRO-3: from_pretrained under HfDeepSpeedConfig),
and training continues exactly as from a whole model."""

import json
import subprocess
import sys

import pytest

from distributed import launch

RUN = ["steps=6", "eval_every=0", "save_every=0", "data.num_train=48", "data.num_dev=4", "data.num_test=30",
       "batch_size=12"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A save_pretrained directory (model and tokenizer) of a tiny OPT."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from zoscale.commands import QUICKSTART

    out = tmp_path_factory.mktemp("pretrained") / "opt-tiny"
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART.parent / "tokenizer")
    torch.manual_seed(3)
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0,
                             bos_token_id=1, eos_token_id=1, dropout=0.0)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return ["model.config=null", f"model.name_or_path={out}", f"model.tokenizer={out}"]


@pytest.fixture(scope="module")
def local(pretrained, tmp_path_factory):
    run = tmp_path_factory.mktemp("local") / "run"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(run), *RUN, *pretrained],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("backend,world,message", [("fsdp", 3, "sharded loading"),
                                                   ("deepspeed", 2, "ZeRO-3 partitions")])
def test_sharded_loading_continues_like_a_whole_model(backend, world, message, pretrained, local, tmp_path):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    done = launch(world, "-m", "zoscale", "train", "--out", str(run), f"backend={backend}", *RUN, *pretrained,
                  timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    assert message in done.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_before"] == local["eval_before"]  # the weights arrived intact
    assert summary["param_sq_sum"] == pytest.approx(local["param_sq_sum"], rel=1e-6)
