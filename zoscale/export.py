"""`zoscale export` of a run that started from pretrained safetensors, one file at a time.

The output mirrors the pretrained files: every tensor they hold, in the run's dtype, with the
trained parameters taken from the checkpoint's pieces (every rank's) instead. Host memory holds one
file's tensors at a time, never the whole model, so OPT-175B exports like OPT-125M. Runs from a
config, or with LoRA (merged), go through the whole model instead (`commands.export`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zoscale.checkpoint import PieceReader
from zoscale.config import ConfigError, ModelConfig


def export_pretrained(model: ModelConfig, source: Path, checkpoint: Path, tokenizer, out: Path) -> None:
    """``source``: the pretrained directory (with safetensors files); ``checkpoint``: a checkpoint
    or best directory of the run."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from zoscale.models import auto_class

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights():  # only for the base-model prefix the files may leave out
        prefix = auto_class(model).from_config(config).base_model_prefix + "."
    dtype = getattr(torch, model.dtype)
    out.mkdir(parents=True, exist_ok=True)
    with PieceReader(checkpoint) as reader:
        trained, written = set(reader.names()), set()
        for file in sorted(source.glob("*.safetensors")):
            tensors = {}
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    name = key if key in trained else prefix + key
                    if name in trained:
                        tensors[key] = reader.whole(name, dtype).view(handle.get_slice(key).get_shape())
                        written.add(name)
                    else:
                        tensors[key] = handle.get_tensor(key).to(dtype)
            save_file(tensors, out / file.name, metadata={"format": "pt"})
    if trained - written:
        raise ConfigError(f"{source} has no tensor for the trained {sorted(trained - written)[:3]}")
    for extra in ("model.safetensors.index.json", "generation_config.json"):
        if (source / extra).is_file():
            shutil.copy(source / extra, out / extra)
    config.dtype = dtype
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
