"""What `zoscale train | export | replay` do (argument parsing is in cli.py)."""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from zoscale.config import ConfigError, load, to_dict
from zoscale.rundir import require_fresh

QUICKSTART = Path(str(resources.files("zoscale.quickstart") / "quickstart.yaml"))


def train(args) -> int:
    code = _train(args)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # Ranks of a torch.distributed job sometimes abort in interpreter teardown after a clean run
        # ("terminate called without an active exception"): leave with the real exit code instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(args) -> int:
    from zoscale.backends.local import check_launch_environment
    from zoscale.rundir import RunDirectory
    from zoscale.signals import EXIT_PREEMPTED, exit_when_the_launcher_dies
    from zoscale.trainer import TRAJECTORY_KEYS, NonFiniteLossError, Preempted, Trainer, resumed_config

    if args.resume is not None:
        if args.config is not None or args.overrides or args.out is not None or args.auto_resume:
            raise ConfigError("--resume continues a run as configured: only --steps and --backend may change")
        run_dir = args.resume
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
        cfg = resumed_config(run_dir, args.steps, args.backend)
    else:
        overrides = list(args.overrides)
        if args.steps is not None:
            overrides.append(f"steps={args.steps}")
        if args.backend is not None:
            overrides.append(f"backend={args.backend}")
        cfg = load(args.config, overrides, defaults=QUICKSTART)
        if args.out is None and (os.environ.get("WORLD_SIZE", "1") != "1" or args.auto_resume):
            raise ConfigError("--out is required when the launcher starts several ranks, and with --auto-resume")
        task = Path(cfg.data.task).stem
        run_dir = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{task}-{cfg.optim.name}"
        if args.auto_resume and (run_dir / "config.yaml").is_file():  # a requeued job: continue the run
            saved = resumed_config(run_dir, cfg.steps, cfg.backend)
            new, old = to_dict(cfg), to_dict(saved)
            changed = [k for k in TRAJECTORY_KEYS if new[k] != old[k]]
            if changed:
                raise ConfigError(f"--auto-resume: {run_dir} holds a run with another {changed[0]}; give its "
                                  f"config or another --out")
            args.resume, cfg = run_dir, saved
            done = _saved_step(run_dir)
            if done is not None and done >= cfg.steps:
                print(f"{run_dir} is complete at step {done}; nothing to do")
                return 0
    check_launch_environment(cfg.backend)
    exit_when_the_launcher_dies()
    main = int(os.environ.get("RANK", "0")) == 0
    with RunDirectory(run_dir, fresh=args.resume is None, main=main):
        trainer = Trainer(cfg, run_dir, resume=args.resume is not None)
        try:
            trainer.run()
        except NonFiniteLossError as e:
            if trainer.comm.is_main:
                print(f"zoscale: error: {e}", file=sys.stderr, flush=True)
            return 1
        except Preempted as e:
            if trainer.comm.is_main:
                print(f"zoscale: {e}", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        finally:
            trainer.backend.teardown()
    if trainer.comm.is_main:
        print(f"run directory: {run_dir}")
    return 0


def _saved_step(run_dir: Path) -> int | None:
    """The step of the run's newest complete checkpoint, if any."""
    from zoscale import checkpoint

    path = checkpoint.find(run_dir / "checkpoints", checksums=False).path
    return None if path is None else json.loads((path / "trainer.json").read_text())["step"]


def _run_config(run: Path):
    """The run's config; a GGUF model source as the safetensors directory its training converted."""
    from dataclasses import replace

    from zoscale.gguf import materialize

    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run directory (no config.yaml)")
    cfg = load(run / "config.yaml")
    return replace(cfg, model=materialize(cfg.model, run / "cache" / "gguf"))


def _initial_model(run: Path):
    """The run's model before training (from its config) and tokenizer."""
    from zoscale.models import build_model, build_tokenizer

    cfg = _run_config(run)
    if cfg.model.config is not None and cfg.model.init_device != "cpu":
        raise ConfigError(f"{run} drew its random weights on its device (model.init_device); they cannot be "
                          f"rebuilt here")
    tokenizer = build_tokenizer(cfg.model)
    return cfg, build_model(cfg.model, vocab_size=len(tokenizer)), tokenizer


def _save_pretrained(model, tokenizer, out: Path) -> None:
    from zoscale.models import unwrap

    unwrap(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


def export(args) -> int:
    from zoscale import checkpoint
    from zoscale.export import export_pretrained
    from zoscale.models import build_tokenizer, snapshot
    from zoscale.shards import local_shards

    require_fresh(args.out, "--out")
    source = checkpoint.latest(args.run / ("checkpoints" if args.checkpoint == "latest" else "best"))
    if source is None:
        raise ConfigError(f"{args.run} has no {args.checkpoint} checkpoint")
    cfg = _run_config(args.run)
    pretrained = snapshot(cfg.model.name_or_path) if cfg.model.name_or_path and cfg.model.lora is None else None
    if pretrained is not None and list(pretrained.glob("*.safetensors")):  # file by file, never the whole model
        export_pretrained(cfg.model, pretrained, source, build_tokenizer(cfg.model), args.out)
        print(f"wrote {args.out}: the files of {pretrained} with the trained parameters, one file at a time")
        return 0
    _, model, tokenizer = _initial_model(args.run)
    checkpoint.read_shards(source, local_shards(model))  # the pieces of every rank, into whole parameters
    _save_pretrained(model, tokenizer, args.out)
    return 0


def replay(args) -> int:
    """Apply the logged updates (seeds and coefficients) to the initial weights, in order."""
    from zoscale.shards import PerturbationEngine, local_shards

    require_fresh(args.out, "--out")
    cfg, model, tokenizer = _initial_model(args.run)
    log = args.run / "seeds.jsonl"
    if not log.is_file():
        raise ConfigError(f"{args.run} has no seeds.jsonl")
    master = torch.float32 if cfg.model.master_weights else None
    distribution = cfg.optim.options.get("distribution", "gaussian")
    version = cfg.optim.options.get("stream", "v1")
    engine = PerturbationEngine(local_shards(model, master_dtype=master), distribution, version=version)
    steps = 0
    with open(log) as f:
        for line in f:
            entry = json.loads(line)
            if "header" in entry:  # runs of 2026-12-02 and before have none: v1
                logged = entry["header"].get("stream", "v1")
                if logged != version:
                    raise ConfigError(f"{log} was written on perturbation stream {logged}, but config.yaml says "
                                      f"{version}; restore config.yaml's optim.stream")
                continue
            for update in entry["updates"]:
                if update is None:
                    raise ConfigError(f"step {entry['step']} of {args.run} used a buffer ({cfg.optim.name}): "
                                      f"its update is not a function of seeds alone, so it cannot be replayed")
                engine.update({int(s): c for s, c in update["terms"]}, update["decay"])
                engine.flush()
            steps += 1
    print(f"replayed {steps} steps")
    _save_pretrained(model, tokenizer, args.out)
    return 0


def evaluate_model(args) -> int:
    """`zoscale eval`: zero-shot or k-shot in-context accuracy of a model on a task, with the code
    that evaluates training runs. The model is the config's (a directory, hub id, GGUF file or a
    config's random weights), or a run's (``--run``: its config and a checkpoint's parameters)."""
    from zoscale import checkpoint, data, gguf, tasks
    from zoscale.comm import Comm
    from zoscale.evaluate import evaluate
    from zoscale.models import build_model, build_tokenizer
    from zoscale.shards import local_shards

    if args.run is not None:
        if args.config is not None:
            raise ConfigError("--run: the model and task come from the run's config.yaml; leave --config out")
        if not (args.run / "config.yaml").is_file():
            raise ConfigError(f"--run: {args.run} is not a run directory (no config.yaml)")
        cfg = load(args.run / "config.yaml", args.overrides)
        if to_dict(cfg)["model"] != to_dict(load(args.run / "config.yaml"))["model"]:
            raise ConfigError("--run: model.* is the run's; only data.* and evaluation keys may change")
        source = checkpoint.latest(args.run / ("checkpoints" if args.checkpoint == "latest" else "best"))
        if source is None:
            raise ConfigError(f"--run: {args.run} has no {args.checkpoint} checkpoint")
        cache = args.run / "cache" / "gguf"
    else:
        cfg = load(args.config, args.overrides, defaults=QUICKSTART)
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zoscale" / "gguf"
    if args.out is not None and args.out.exists():
        raise ConfigError(f"--out: {args.out} exists (nothing is overwritten)")
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
    encoded = [data.encode(e, tokenizer, cfg.data.max_length, masked) for e in shown]
    cut = sum(len(tokenizer(e.prompt)["input_ids"]) > len(x.prompt) for e, x in zip(shown, encoded))
    metrics = evaluate(model, tokenizer, encoded, task.evaluation, cfg.eval_batch_size, tokenizer.pad_token_id,
                       device, Comm(), cfg.data.max_new_tokens, mask_id=tokenizer.mask_token_id if masked else None)
    result = {"task": task.name, "split": args.split, "shots": args.shots, "prompts_cut": cut,
              "model": str(args.run or model_cfg.name_or_path or "config"), **metrics}
    scores = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "examples")
    print(f"{task.name} {args.split}, {args.shots}-shot: {scores} ({int(metrics['examples'])} examples)")
    if cut:  # the prompt's start goes first: demonstrations, or the examples' own beginnings
        print(f"warning: {cut} of {len(shown)} prompts were longer than data.max_length {cfg.data.max_length} and "
              f"lost their first tokens; raise data.max_length to keep them whole")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0
