"""`zoscale eval`: zero-shot or k-shot in-context accuracy of a model on a task."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from zoscale.config import load, to_dict
from zoscale.errors import ConfigError
from zoscale.train.rundir import require_writable, write_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML: its model and task (default: the quickstart)")
    parser.add_argument("--run", type=Path, help="a run directory: its model, task and trained parameters")
    parser.add_argument("--checkpoint", choices=("latest", "best"), default="latest", help="with --run")
    parser.add_argument("--shots", type=int, default=0, help="solved training examples shown before each one")
    parser.add_argument("--split", choices=("test", "dev"), default="test")
    parser.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    parser.epilog = "key=value arguments override config keys (model.gguf_file=FILE, data.num_test=200, ...)."


def run(args) -> int:
    """`zoscale eval`: zero-shot or k-shot in-context accuracy of a model on a task, with the code
    that evaluates training runs. The model is the config's (a directory, hub id, GGUF file or a
    config's random weights), or a run's (``--run``: its config and a checkpoint's parameters)."""
    import torch

    from zoscale.engine import Comm, local_shards
    from zoscale.models import build_model, build_tokenizer
    from zoscale.quickstart import QUICKSTART
    from zoscale.train import checkpoint, data, gguf, tasks
    from zoscale.train.evaluate import evaluate

    if args.shots < 0:
        raise ConfigError(f"--shots: must be >= 0, got {args.shots}")
    if args.run is not None:
        if args.config is not None:
            raise ConfigError("--run: the model and task come from the run's config.yaml; leave --config out")
        if not (args.run / "config.yaml").is_file():
            raise ConfigError(f"--run: {args.run} is not a run directory (no config.yaml)")
        cfg = load(args.run / "config.yaml", args.overrides)
        if to_dict(cfg)["model"] != to_dict(load(args.run / "config.yaml"))["model"]:
            raise ConfigError("--run: model.* is the run's; only data.* and evaluation keys may change")
        source = checkpoint.find(args.run / ("checkpoints" if args.checkpoint == "latest" else "best")).report("eval")
        if source is None:
            raise ConfigError(f"--run: {args.run} has no {args.checkpoint} checkpoint")
        cache = args.run / "cache" / "gguf"
    else:
        cfg = load(args.config, args.overrides, defaults=QUICKSTART)
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zoscale" / "gguf"
    if args.out is not None and args.out.exists():
        raise ConfigError(f"--out: {args.out} exists (nothing is overwritten)")
    if args.out is not None:
        require_writable(args.out, "--out")
    try:
        task = tasks.get(cfg.data.task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.kind == "masked" and args.shots:
        raise ConfigError("--shots: in-context demonstrations need a causal LM (model.kind: causal)")
    splits = data.sample(cfg.data, task)
    if args.shots > len(splits["train"]):
        raise ConfigError(f"--shots {args.shots}: the training sample holds {len(splits['train'])} examples "
                          f"(data.num_train)")
    examples = splits[args.split]
    if not examples:
        raise ConfigError(f"--split {args.split}: the sample is empty (data.num_{args.split})")
    demonstrations = splits["train"][: args.shots]  # the same ones before every example
    model_cfg = gguf.materialize(cfg.model, cache)
    tokenizer = build_tokenizer(model_cfg)
    model = build_model(model_cfg, vocab_size=len(tokenizer))
    if args.run is not None:
        checkpoint.read_shards(source, local_shards(model))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    masked = cfg.model.kind == "masked"
    shown = [tasks.with_demonstrations(e, demonstrations) for e in examples]
    # the model reads at most its positions: longer prompts lose their first tokens, as data.max_length cuts them
    positions = getattr(model.config, "max_position_embeddings", None) or cfg.data.max_length
    limit = min(cfg.data.max_length, positions)
    encoded = [data.encode(e, tokenizer, limit, masked) for e in shown]
    cut = sum(len(tokenizer(e.prompt)["input_ids"]) > len(x.prompt) for e, x in zip(shown, encoded))
    metrics = evaluate(model, tokenizer, encoded, task.evaluation, cfg.eval_batch_size, tokenizer.pad_token_id,
                       device, Comm(), cfg.data.max_new_tokens, mask_id=tokenizer.mask_token_id if masked else None)
    result = {"task": task.name, "split": args.split, "shots": args.shots, "prompts_cut": cut,
              "model": str(args.run or model_cfg.name_or_path or "config"),
              "checkpoint": None if args.run is None else source.name, **metrics}
    scores = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "examples")
    print(f"{task.name} {args.split}, {args.shots}-shot: {scores} ({int(metrics['examples'])} examples)")
    if cut:  # the prompt's start goes first: demonstrations, or the examples' own beginnings
        bound = f"data.max_length {limit}" if limit == cfg.data.max_length else f"the model's {limit} positions"
        print(f"warning: {cut} of {len(shown)} prompts were longer than {bound} and lost their first tokens"
              + ("; raise data.max_length to keep them whole" if limit == cfg.data.max_length else ""))
    if args.out is not None:
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0
