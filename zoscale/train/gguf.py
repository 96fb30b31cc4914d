"""GGUF checkpoints (llama.cpp's format) as a model source: ``model.gguf_file``.

transformers reads a GGUF (with the `gguf` package: pip install 'zoscale[real]'), dequantising
every tensor to float. zoscale does that once per file, into a safetensors directory under the
run's cache (RUN/cache/gguf/NAME-HASH/, with the tokenizer the GGUF carries unless
``model.tokenizer`` names another), and from then on the model is that directory: sharded loading
reads only each rank's rows of it, and export writes its files with the trained parameters. The
conversion holds the dequantised model in host memory once, on rank 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_model

from zoscale.config import ModelConfig
from zoscale.engine.comm import Comm, print0
from zoscale.errors import ConfigError


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def converted_path(gguf_file: Path, cache: Path) -> Path:
    return cache / f"{gguf_file.stem}-{_digest(gguf_file)}"


def _manifest(directory: Path) -> dict[str, str]:
    return {f.name: _digest(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != "manifest.json"}


def _intact(out: Path) -> str | None:
    """Why a cached conversion cannot be used, or None."""
    try:
        recorded = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return "its manifest.json is missing or unreadable"
    if recorded != _manifest(out):
        return "its files do not match its manifest.json"
    return None


def convert(gguf_file: Path, out: Path, with_tokenizer: bool) -> Path:
    """out (``converted_path``): the GGUF as a safetensors directory (float32), written atomically
    once, with a manifest of its files' checksums that every later use verifies."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("model.gguf_file: reading GGUF needs the gguf package (pip install 'zoscale[real]')") \
            from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out.exists():
        problem = _intact(out)
        if problem is None:
            return out
        print0(f"{out}: {problem}; converting {gguf_file} again")
        shutil.rmtree(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    source = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(**source)
        # transformers marks a model read from GGUF as quantized and will not save_pretrained it;
        # its tensors are plain floats by now: they and the config (without that mark) are the model
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
        config = model.config
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(tmp)
        if with_tokenizer:
            AutoTokenizer.from_pretrained(**source).save_pretrained(tmp)
        (tmp / "manifest.json").write_text(json.dumps(_manifest(tmp), indent=1))
    except Exception as e:  # a damaged file raises many kinds: ValueError, KeyError, OSError, struct.error
        shutil.rmtree(tmp, ignore_errors=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.gguf_file: cannot read {gguf_file} ({first})") from None
    os.replace(tmp, out)
    print0(f"converted {gguf_file} to {out} (once; later runs and resumes read the safetensors)")
    return out


def materialize(model: ModelConfig, cache: Path, comm: Comm | None = None) -> ModelConfig:
    """The model config with a GGUF source replaced by its converted directory (rank 0 converts,
    the other ranks wait); any other config as it is."""
    if model.gguf_file is None:
        return model
    comm = comm or Comm()
    path = converted_path(Path(model.gguf_file), cache)  # every rank hashes the file: no broadcast needed
    if comm.is_main:
        cache.mkdir(parents=True, exist_ok=True)
        convert(Path(model.gguf_file), path, with_tokenizer=model.tokenizer is None)
    comm.barrier()
    return replace(model, name_or_path=str(path), gguf_file=None, tokenizer=model.tokenizer or str(path))
