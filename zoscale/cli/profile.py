"""`zoscale profile`: peak memory and step time of ZO optimizers against first-order baselines.

Each method runs in a fresh process (so peaks do not leak between methods) on the same model and
batches: the ZO optimizers through the trainer's own step, AdamW and SGD with a backward pass
through the same loss. An out-of-memory is a result, not a crash. Writes DIR/report.json,
DIR/report.md and DIR/memory_over_time.png, DIR/peaks.png. With `--nproc N` each method runs on N
ranks under torchrun (with the config's backend); every rank measures itself and the report lists
every rank, headed by the maximum over ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from zoscale.cli import positive_int
from zoscale.cli.bench import device_description
from zoscale.errors import ConfigError
from zoscale.train.memory import GIB, MemorySampler

FIRST_ORDER = ("adamw", "sgd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (default: the quickstart)")
    parser.add_argument("--optimizers", help="comma-separated: registered ZO optimizers and adamw, sgd (default: all)")
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--nproc", type=positive_int, default=1, help="ranks per method (torchrun; set backend=...)")
    parser.add_argument("--seq", type=positive_int, help="random batches of this many tokens instead of the task's")
    parser.add_argument("--force", action="store_true", help="overwrite an existing report in --out")


def run(args) -> int:
    from zoscale.config import load
    from zoscale.optim import REGISTRY
    from zoscale.quickstart import QUICKSTART

    known = list(dict.fromkeys([*REGISTRY, *FIRST_ORDER]))  # its own first-order step (any backend) for these
    methods = [m for m in (args.optimizers or ",".join(known)).split(",") if m]
    unknown = sorted(set(methods) - set(known))
    if unknown or not methods:
        raise ConfigError(f"--optimizers: unknown {unknown}; choose from {known}")
    for method in methods:  # the config and overrides, checked for every method before any starts
        cfg = load(args.config, method_overrides(method, args.overrides), defaults=QUICKSTART)
    positions = (cfg.model.config or {}).get("max_position_embeddings")
    if args.seq and positions and args.seq > positions:
        raise ConfigError(f"--seq {args.seq}: the model reads at most {positions} positions (max_position_embeddings)")
    if (args.out / "report.json").exists() and not args.force:
        raise ConfigError(f"{args.out / 'report.json'} exists; pass --force to overwrite it")
    profile(args.config, args.overrides, methods, args.steps, args.out, args.nproc, args.seq)
    print(f"report in {args.out}/report.md")
    return 0


def synthetic_batches(trainer, seq: int):
    """Batches of random prompts of ``seq`` tokens (two one-token candidates each), shaped like the
    run's batches: for memory at a fixed sequence length whatever the task data's lengths."""
    from zoscale.train.data import Encoded

    vocab = trainer.model.config.vocab_size if hasattr(trainer.model, "config") else len(trainer.tokenizer)
    generator = torch.Generator().manual_seed(0)

    def batch(step: int):
        examples = []
        for _ in range(trainer.cfg.batch_size // trainer.comm.world_size or 1):
            ids = torch.randint(3, vocab, (seq,), generator=generator).tolist()
            examples.append(Encoded(ids[:-1], [[ids[-1]], [(ids[-1] + 1) % vocab]], 0, [ids[-1]], []))
        return trainer.pack(examples, pad_to=seq)

    return batch


def method_overrides(method: str, overrides: list[str]) -> list[str]:
    """The run's overrides for one method: its optimizer named; first-order baselines keep the
    model and data but none of the ZO optimizer's options (they build a trainer as MeZO would)."""
    if method in FIRST_ORDER:  # a trainer of the first registered optimizer, which never steps
        from zoscale.optim import REGISTRY

        return [*(o for o in overrides if not o.startswith("optim.")), f"optim.name={next(iter(REGISTRY))}"]
    return [*overrides, f"optim.name={method}"]


def run_method(config: Path | None, overrides: list[str], method: str, steps: int, out: Path,
               seq: int | None = None) -> dict:
    """In this process: `steps` steps of `method` with memory sampling; the result as a dict."""
    from zoscale.config import load
    from zoscale.quickstart import QUICKSTART
    from zoscale.train.trainer import Trainer

    if method in FIRST_ORDER and "backend=deepspeed" in overrides:
        raise SystemExit("first-order baselines run on the local, ddp and fsdp backends (ZeRO-3 needs its engine)")
    cfg = load(config, [*method_overrides(method, overrides), f"steps={steps}", "eval_every=0", "save_every=0",
                        "eval_before=false"], defaults=QUICKSTART)
    trainer = Trainer(cfg, out / "run")
    rank = trainer.comm.rank
    make_batch = synthetic_batches(trainer, seq) if seq else trainer.batch
    trainer.memory = MemorySampler(0.01).start()  # the trainer tags its forwards, the engine its passes
    sampler = trainer.memory
    step_times, result = [], {"method": method}
    try:
        first_order = _first_order(method, trainer.model) if method in FIRST_ORDER else None
        for step in range(steps):
            batch = make_batch(step)
            t0 = time.time()
            if first_order is None:
                trainer.train_step(batch)
            else:
                with sampler.phase("forward_backward"):
                    # the model's own forward (FSDP's autograd hooks), the same loss on its logits
                    logits = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                    total, count = batch.loss_from_token_logprobs(batch.logprobs_from_logits(logits[batch.scored]))
                    (total / count).backward()
                with sampler.phase("update"):
                    first_order.step()
                    first_order.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_times.append(time.time() - t0)
    except torch.OutOfMemoryError as e:
        result.update(oom=True, error=str(e).splitlines()[0])
    finally:
        sampler.stop()
        trainer.backend.teardown()
    result.update(rank=rank, oom=result.get("oom", False), steps=len(step_times),
                  step_time_s=sorted(step_times)[len(step_times) // 2] if step_times else None,
                  nvml_missing=sampler.nvml_missing, peaks=sampler.summary(),
                  timeline=[{k: v for k, v in s.items()} for s in sampler.samples])
    return result


def _first_order(method: str, model):
    params = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=1e-5) if method == "adamw" else torch.optim.SGD(params, lr=1e-5)


def profile(config: Path | None, overrides: list[str], methods: list[str], steps: int, out: Path,
            nproc: int = 1, seq: int | None = None) -> dict:
    """Every method in a fresh process (or torchrun job), then the report."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, method in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {method}: {steps} steps on {nproc} rank(s) ...", flush=True)
        where = out / method
        where.mkdir(parents=True, exist_ok=True)
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc_per_node={nproc}"]
        cmd = [*launcher, "-m", "zoscale.cli.profile", str(config or ""), method, str(steps), str(where), str(seq or 0),
               *overrides]
        done = subprocess.run(cmd, capture_output=True, text=True)
        ranks = [json.loads(f.read_text()) for f in sorted(where.glob("result-rank*.json"))]
        if done.returncode != 0 or len(ranks) != nproc:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append({"method": method, "failed": True, "error": tail[0]})
            print(f"[{i}/{len(methods)}] {method}: failed: {tail[0]}", flush=True)
            continue
        result = merge_ranks(ranks)
        results.append(result)
        print(f"[{i}/{len(methods)}] {method}: {_headline(result)}", flush=True)
    report = {"date": datetime.date.today().isoformat(), "hardware": device_description(), "steps": steps, "seq": seq,
              "config": str(config) if config else "quickstart", "overrides": overrides, "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot(report, out)
    return report


def merge_ranks(ranks: list[dict]) -> dict:
    """One method's per-rank results: the headline is the maximum over ranks (the rank that limits
    the run); every rank is kept under `ranks`."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    merged = dict(ranks[0])
    keys = {k for r in ranks for k in r.get("peaks", {})}
    merged["peaks"] = {k: max(r["peaks"].get(k, 0.0) for r in ranks) for k in keys}
    times = [r["step_time_s"] for r in ranks if r.get("step_time_s")]
    merged["step_time_s"] = max(times) if times else None
    merged["oom"] = any(r.get("oom") for r in ranks)
    if len(ranks) > 1:
        merged["ranks"] = [{k: v for k, v in r.items() if k != "timeline"} for r in ranks]
    return merged


def _peak(result: dict) -> tuple[str, float] | None:
    """The headline peak: NVML device memory when measured, else host RSS."""
    peaks = result.get("peaks", {})
    for key, label in (("memory/nvml_process_used_peak_gib", "GPU (NVML)"), ("memory/host_rss_peak_gib", "host RSS")):
        if key in peaks:
            return label, peaks[key]
    return None


def _headline(result: dict) -> str:
    if result.get("oom"):
        return "out of memory"
    peak = _peak(result)
    step = result.get("step_time_s")
    return f"peak {peak[1]:.3f} GiB ({peak[0]}), {step * 1e3:.1f} ms/step" if peak and step else "no data"


def markdown(report: dict) -> str:
    rows = ["| method | peak GPU, NVML (GiB) | peak allocated (GiB) | peak host RSS (GiB) | step (ms) | note |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        p = r.get("peaks", {})
        cell = lambda key: f"{p[key]:.3f}" if key in p else "-"  # noqa: E731
        note = "out of memory" if r.get("oom") else ("failed: " + r["error"] if r.get("failed") else "")
        step = f"{r['step_time_s'] * 1e3:.1f}" if r.get("step_time_s") else "-"
        rows.append(f"| {r['method']} | {cell('memory/nvml_process_used_peak_gib')} | "
                    f"{cell('memory/allocated_peak_gib')} | {cell('memory/host_rss_peak_gib')} | {step} | {note} |")
        for rank in r.get("ranks", []):
            q = rank.get("peaks", {})
            value = lambda key: f"{q[key]:.3f}" if key in q else "-"  # noqa: E731
            rows.append(f"| {r['method']}, rank {rank['rank']} | {value('memory/nvml_process_used_peak_gib')} | "
                        f"{value('memory/allocated_peak_gib')} | {value('memory/host_rss_peak_gib')} | "
                        f"{rank['step_time_s'] * 1e3:.1f} | |")
    nvml = next((r.get("nvml_missing") for r in report["results"] if r.get("nvml_missing")), None)
    batches = f", random batches of {report['seq']} tokens" if report.get("seq") else ""
    lines = [f"# Memory profile, {report['date']}, {report['hardware']}", "",
             f"{report['steps']} steps per method, each in a fresh process{batches}; config {report['config']} "
             f"{' '.join(report['overrides'])}.", "", *rows, ""]
    if nvml:
        lines += [f"NVML unavailable here ({nvml}): host and allocator memory only.", ""]
    lines += ["![memory over time](memory_over_time.png) ![peaks](peaks.png)", ""]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in report["results"]:
        timeline = r.get("timeline") or []
        key = "process_used" if any("process_used" in s for s in timeline) else "host_rss"
        ax.plot([s["t"] for s in timeline if key in s], [s[key] / GIB for s in timeline if key in s], label=r["method"])
    ax.set(xlabel="seconds", ylabel="GiB", title="memory over time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory_over_time.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["method"] for r in report["results"]]
    values = [(_peak(r) or ("", 0.0))[1] for r in report["results"]]
    ax.bar(names, values)
    ax.set(ylabel="peak GiB", title="peak memory per method")
    fig.tight_layout()
    fig.savefig(out / "peaks.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # the per-method worker (one per rank): CONFIG METHOD STEPS OUT_DIR SEQ [overrides]
    config_arg, method_arg, steps_arg, out_arg, seq_arg, *rest = sys.argv[1:]
    result = run_method(Path(config_arg) if config_arg else None, rest, method_arg, int(steps_arg), Path(out_arg),
                        int(seq_arg) or None)
    (Path(out_arg) / f"result-rank{result['rank']}.json").write_text(json.dumps(result))

