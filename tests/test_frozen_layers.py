"""model.cache_frozen_layers: the layers below the first trainable one run once per example, and a
run gives the uncached run's trajectory (to rounding), resumes bit-exact, and shares its cache."""

from __future__ import annotations

import os

import pytest
import torch
from runs import lines, zoscale

from zoscale.config import load
from zoscale.errors import ConfigError
from zoscale.models import build_model, select_trainable
from zoscale.quickstart import QUICKSTART
from zoscale.train.frozen_layers import FrozenLayers

LLAMA = ("model.config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 4, "
         "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128, pad_token_id: 0, "
         "bos_token_id: 1, eos_token_id: 1, tie_word_embeddings: false}")
GPT2 = ("model.config={model_type: gpt2, n_embd: 32, n_layer: 4, n_head: 4, n_positions: 128, bos_token_id: 1, "
        "eos_token_id: 1}")
TOP = r"model.trainable=(layers|h)\.[23]\.|model\.norm|decoder\.final_layer_norm|ln_f"  # the top two layers, final norm


def tiny(config: str, trainable: str) -> torch.nn.Module:
    cfg = load(None, [config], defaults=QUICKSTART)
    model = build_model(cfg.model, vocab_size=100)
    select_trainable(model, trainable)
    return model


def right_padded(lengths: list[int], vocab: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


OPT = "model.config.num_hidden_layers=4"  # the quickstart's OPT, two layers deeper


@pytest.mark.parametrize("config", [LLAMA, GPT2, OPT], ids=["llama", "gpt2", "opt"])
def test_the_cached_body_is_the_models_own(config, tmp_path):
    model = tiny(config, TOP.split("=", 1)[1])
    frozen = FrozenLayers(model, tmp_path)
    assert frozen.frozen == 2
    ids, mask = right_padded([9, 5, 12])
    frozen.check(ids, mask)  # as a run starts: a relative difference of at most 1e-4
    with torch.no_grad():
        plain = frozen.base(input_ids=ids, attention_mask=mask).last_hidden_state
        cached = frozen.body(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(cached[real], plain[real], rtol=1e-5, atol=1e-5)
    assert len(frozen.entries) == 3 and list(tmp_path.glob("*/*.safetensors"))
    # the layers below run only to fill: afterwards the same batch does not enter them
    calls = []
    hook = frozen.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        again = frozen.body(ids, mask)
    hook.remove()
    assert not calls and torch.equal(again, cached)


def test_the_store_is_shared_and_keyed_by_the_frozen_weights(tmp_path):
    model = tiny(LLAMA, TOP.split("=", 1)[1])
    ids, mask = right_padded([7, 11])
    first = FrozenLayers(model, tmp_path)
    with torch.no_grad():
        expected = first.body(ids, mask)
    second = FrozenLayers(model, tmp_path)  # another run: reads the entries, computes nothing
    assert len(second.entries) == 2
    with torch.no_grad():
        assert torch.equal(second.body(ids, mask), expected)
    # two runs started together: the later filler reads what the earlier one wrote meanwhile
    early, late = FrozenLayers(model, tmp_path), FrozenLayers(model, tmp_path)
    more = [tuple(range(5, 5 + n)) for n in (4, 6, 9)]
    early.fill(more)
    calls = []
    hook = late.layers[0].register_forward_hook(lambda *a: calls.append(1))
    late.fill(more)
    hook.remove()
    assert not calls and all(torch.equal(late.entries[s], early.entries[s]) for s in more)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.1)  # other weights below the cut: other entries
    assert len(FrozenLayers(model, tmp_path).entries) == 0


@pytest.mark.parametrize("trainable,message", [
    (r"layers\.0\.|layers\.3\.", "decoder layer 0 holds trainable parameters"),
    (r"embed_tokens|layers\.3\.", "model.embed_tokens.weight is trainable and feeds decoder layer 3"),
])
def test_a_trainable_parameter_below_the_cut_is_refused(trainable, message):
    with pytest.raises(ConfigError, match=message):
        FrozenLayers(tiny(LLAMA, trainable))


def test_a_tied_output_embedding_is_an_input_embedding_too():
    model = tiny(LLAMA.replace("tie_word_embeddings: false", "tie_word_embeddings: true"), r"layers\.3\.")
    model.lm_head.weight.requires_grad_(True)  # the head, trained: the same tensor as the input embedding
    with pytest.raises(ConfigError, match="embed_tokens.weight is trainable"):
        FrozenLayers(model)


@pytest.mark.parametrize("overrides,message", [
    (["backend=fsdp"], "backend fsdp gathers the layers' parameters"),
    (["objective=f1"], "objective f1 generates"),
])
def test_what_the_cache_cannot_serve_is_refused_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(None, ["model.cache_frozen_layers=true", *overrides], defaults=QUICKSTART)


def test_a_cached_run_resumes_bit_exact(tmp_path):
    """(Its trajectory is the uncached one's to rounding: the body's equality above.)"""
    env = {**os.environ, "ZOSCALE_CACHE": str(tmp_path / "cache")}
    common = [LLAMA, TOP, "model.cache_frozen_layers=true", "eval_every=0", "save_every=10", "data.num_train=64",
              "data.num_dev=0", "data.num_test=32", "batch_size=8", "eval_before=false", "optim.lr=1e-2"]
    straight = zoscale("train", "--out", tmp_path / "straight", *common, "steps=20", env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "run once per example: 96 sequences" in straight.stdout + straight.stderr
    # stopped at step 10 (its checkpoint), then resumed in a fresh process that reads the cache
    first = zoscale("train", "--out", tmp_path / "resumed", *common, "steps=10", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    second = zoscale("train", "--resume", tmp_path / "resumed", "--steps", 20, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    steps = {name: [(m["loss"], m["projected_grad"]) for m in lines(tmp_path / name / "metrics.jsonl") if "loss" in m]
             for name in ("straight", "resumed")}
    assert len(steps["straight"]) == 20 and steps["resumed"] == steps["straight"]
