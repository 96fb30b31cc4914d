"""Build the model and tokenizer a config names, choose which parameters train, and split a causal LM
into body and head."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zoscale.config import ModelConfig
from zoscale.engine import dual
from zoscale.errors import ConfigError


def build_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise ConfigError(f"{key}: no such directory {source}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {source} ({str(e).strip().splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(cfg: ModelConfig, vocab_size: int | None = None, init_device: torch.device | str = "cpu"):
    """A causal LM from the hub or a local directory, or built from a config dict with random
    weights (seeded by ``init_seed``) drawn on ``init_device``: the CPU by default, so a config's
    weights are the same on every machine (export and replay rebuild them); benchmarks draw them on
    the GPU, in seconds. Dropout is off: ZO forwards must see one function."""
    auto, dtype = auto_class(cfg), getattr(torch, cfg.dtype)
    if cfg.name_or_path is not None:
        model = auto.from_pretrained(cfg.name_or_path, dtype=dtype)
    else:
        torch.manual_seed(cfg.init_seed)
        with torch.device(init_device):  # drawn in the model's dtype: OPT-30B never exists in fp32
            model = auto.from_config(transformers_config(cfg, vocab_size), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if cfg.lora is not None:
        model = _add_lora(model, cfg.lora)
    else:
        select_trainable(model, cfg.trainable)
    return model


def snapshot(name_or_path: str, download: bool = True) -> Path:
    """A local directory as it is; a hub id's config and safetensors files in the Hugging Face
    cache (downloaded unless ``download`` is False)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    files = ["*.json", "*.safetensors"]
    return Path(snapshot_download(name_or_path, allow_patterns=files, local_files_only=not download))


def auto_class(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if cfg.kind == "masked" else AutoModelForCausalLM


def transformers_config(cfg: ModelConfig, vocab_size: int | None = None):
    """The transformers config of a model built from ``cfg.config`` (the tokenizer's vocabulary
    size unless the config sets one)."""
    from transformers import AutoConfig

    fields = dict(cfg.config)
    model_type = fields.pop("model_type")
    if vocab_size is not None:
        fields.setdefault("vocab_size", vocab_size)
    return AutoConfig.for_model(model_type, **fields)


def select_trainable(model: torch.nn.Module, pattern: str) -> None:
    matched = 0
    for name, p in model.named_parameters():
        train = pattern == "all" or re.search(pattern, name) is not None
        p.requires_grad_(train)
        matched += train
    if matched == 0:
        raise ConfigError(f"model.trainable: {pattern!r} matches no parameter name")


def _add_lora(model, options: dict):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("model.lora: needs peft (pip install peft)") from None
    try:
        lora = LoraConfig(task_type="CAUSAL_LM", **options)
    except TypeError as e:
        raise ConfigError(f"model.lora: {e}") from None
    return get_peft_model(model, lora).eval()


def unwrap(model):
    """The transformers model under a peft wrapper (for save_pretrained after merging)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers: its modules of the classes it names in `_no_split_modules` (the
    units FSDP2 shards, ZeRO-3 gathers whole, `zoscale plan` counts and the frozen-layer cache cuts)."""
    units = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in units]


def causal_lm(model):
    """The transformers causal LM itself, also under a peft wrapper (whose LoRA layers it contains)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class BodyHead:
    """A causal LM split at its output embedding: ``body`` gives the last hidden state, ``head`` the
    logits from it, so losses apply the head at the scored positions only and PseuZO differentiates
    through the head alone. A sharded backend supplies its own halves (FSDP2's root forward, the
    head's weight gathered); by default the base model and the output embedding are called."""

    body_fn: Callable | None = None  # (model, input_ids, attention_mask) -> hidden
    head_fn: Callable | None = None  # (model, hidden) -> logits

    def body(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.body_fn is not None:
            return self.body_fn(model, input_ids, attention_mask)
        return causal_lm(model).base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def head(self, model, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_fn is not None:
            return self.head_fn(model, hidden)
        return causal_lm(model).get_output_embeddings()(hidden)


def linear_head(head: torch.nn.Module, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The output embedding applied with gathered copies of its parameters; inside a dual forward
    (engine/dual.py), each half of ``hidden`` with its side's perturbation of them."""
    pair = dual.active()
    if pair is None:
        return torch.nn.functional.linear(hidden, weight, bias)
    return pair.run(head, {"weight": weight, "bias": bias},
                    lambda values, h: torch.nn.functional.linear(h, values["weight"], values["bias"]), hidden)
