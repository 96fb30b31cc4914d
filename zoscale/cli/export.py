"""`zoscale export RUN --out DIR`: a run's parameters as a transformers save_pretrained directory.

A run that started from pretrained safetensors is exported one file at a time: the output mirrors
the pretrained files, every tensor they hold, in the run's dtype, with the trained parameters taken
from the checkpoint's pieces (every rank's) instead. Host memory holds one file's tensors at a
time, never the whole model, so OPT-175B exports like OPT-125M. Runs from a config, or with LoRA
(merged), go through the whole model instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zoscale.errors import ConfigError
from zoscale.train.rundir import require_fresh, require_writable, written_whole


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", choices=("latest", "best"), default="latest")


def run_config(run: Path):
    """The run's config; a GGUF model source as the safetensors directory its training converted."""
    from dataclasses import replace

    from zoscale.config import load
    from zoscale.train.gguf import materialize

    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run directory (no config.yaml)")
    cfg = load(run / "config.yaml")
    return replace(cfg, model=materialize(cfg.model, run / "cache" / "gguf"))


def initial_model(run: Path):
    """The run's model before training (from its config) and tokenizer."""
    from zoscale.models import build_model, build_tokenizer

    cfg = run_config(run)
    if cfg.model.config is not None and cfg.model.init_device != "cpu":
        raise ConfigError(f"{run} drew its random weights on its device (model.init_device); they cannot be "
                          f"rebuilt here")
    tokenizer = build_tokenizer(cfg.model)
    return cfg, build_model(cfg.model, vocab_size=len(tokenizer)), tokenizer


def save_pretrained(model, tokenizer, out: Path) -> None:
    """A save_pretrained directory that appears whole or not at all."""
    from zoscale.models import unwrap

    with written_whole(out) as tmp:
        unwrap(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"wrote {out}")


def run(args) -> int:
    from zoscale.engine import local_shards
    from zoscale.models import build_tokenizer, snapshot
    from zoscale.train import checkpoint

    require_fresh(args.out, "--out")
    require_writable(args.out, "--out")
    source = checkpoint.find(args.run / ("checkpoints" if args.checkpoint == "latest" else "best")).report("export")
    if source is None:
        raise ConfigError(f"{args.run} has no {args.checkpoint} checkpoint")
    cfg = run_config(args.run)
    pretrained = snapshot(cfg.model.name_or_path) if cfg.model.name_or_path and cfg.model.lora is None else None
    if pretrained is not None and list(pretrained.glob("*.safetensors")):  # file by file, never the whole model
        with written_whole(args.out) as out:
            export_pretrained(cfg.model, pretrained, source, build_tokenizer(cfg.model), out)
        print(f"wrote {args.out}: the files of {pretrained} with the trained parameters of {source.name}, one file "
              f"at a time")
        return 0
    _, model, tokenizer = initial_model(args.run)
    checkpoint.read_shards(source, local_shards(model))  # the pieces of every rank, into whole parameters
    print(f"exporting {source.name} of {args.run}")
    save_pretrained(model, tokenizer, args.out)
    return 0


def export_pretrained(model, source: Path, checkpoint: Path, tokenizer, out: Path) -> None:
    """``source``: the pretrained directory (with safetensors files); ``checkpoint``: a checkpoint
    or best directory of the run."""
    import shutil

    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from zoscale.models import auto_class
    from zoscale.train.checkpoint import PieceReader

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
