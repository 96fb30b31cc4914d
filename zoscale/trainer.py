"""`zoscale train`: the loop. Read top to bottom: setup, the step, logging, evaluation, checkpoints.

Run directory:
    config.yaml        the resolved config (what `--resume` reloads)
    metrics.jsonl      one line per step (and per evaluation)
    seeds.jsonl        a header (the perturbation stream), then the update of every step as seeds and
                       coefficients (`zoscale replay`)
    checkpoints/       resumable state, written atomically; best/ holds the best dev parameters
    summary.json       evaluations and parameter statistics at the end
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import zoscale
from zoscale import backends, checkpoint, data, gguf, tasks
from zoscale.comm import Comm, print0
from zoscale.config import ConfigError, TrainConfig, to_dict
from zoscale.evaluate import evaluate, headline
from zoscale.losses import Batch, sequence_length
from zoscale.memory import MemorySampler
from zoscale.models import build_tokenizer
from zoscale.optim import REGISTRY
from zoscale.optim.base import Objective
from zoscale.shards import resident
from zoscale.signals import StopRequest


class NonFiniteLossError(RuntimeError):
    """Training diverged: the run stopped without saving non-finite parameters (the message is one line)."""


class Preempted(RuntimeError):
    """A stop signal ended the run at a step boundary, after a checkpoint."""


# What a resumed run must share with the checkpoint it continues (the trajectory); the rest
# (steps, backend, evaluation and logging cadence) may change between sessions.
TRAJECTORY_KEYS = ("model", "data", "optim", "seed", "batch_size")


def parameter_stats(optimizer) -> dict[str, float]:
    """Global statistics of the trainable parameters (float64, over every rank's shards)."""
    local = [0.0, 0.0]
    for batch in resident(optimizer.shards):
        local[0] += sum(s.tensor.double().sum().item() for s in batch)
        local[1] += sum(s.tensor.double().pow(2).sum().item() for s in batch)
    total, squares = optimizer.param_sums(local)
    return {"param_sum": total, "param_sq_sum": squares}


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, run_dir
        self.backend = backends.get(cfg.backend, cfg.deepspeed_config, cfg.fsdp_compute_dtype, cfg.fsdp_cpu_offload)
        self.comm, self.device = self.backend.setup(cfg.collective_timeout_s)
        self.resume_from = self._checkpoint_to_resume() if resume else None
        try:
            self.task = tasks.get(cfg.data.task)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        masked = cfg.model.kind == "masked"
        if masked and (self.task.train_objective != "classification" or self.task.evaluation != "candidates"):
            raise ConfigError(f"model.kind: masked LMs score candidates at a mask; task {self.task.name} is not a "
                              f"classification task")
        self.objective = "masked" if masked else self.task.train_objective
        self.model_config = gguf.materialize(cfg.model, run_dir / "cache" / "gguf", self.comm)
        self.tokenizer = build_tokenizer(self.model_config)
        self.mask_id = self.tokenizer.mask_token_id if masked else None
        splits = data.sample(cfg.data, self.task)
        if not splits["train"]:
            raise ConfigError("data: the training sample is empty")
        if cfg.batch_size > len(splits["train"]):
            raise ConfigError(f"batch_size: {cfg.batch_size} exceeds the training sample ({len(splits['train'])} "
                              f"examples, data.num_train)")
        encode = lambda examples: [data.encode(e, self.tokenizer, cfg.data.max_length, masked)  # noqa: E731
                                   for e in examples]
        self.train, self.dev, self.test = (encode(splits[k]) for k in ("train", "dev", "test"))

        self.model = self.backend.build(self.model_config, len(self.tokenizer), self.device)
        options = {"seed": cfg.seed, **cfg.optim.options}
        if self.resume_from is not None:  # run properties (stream, momentum dtype) stay what the run began with
            saved = checkpoint.load(self.resume_from, Comm(distributed=False))[0]["config"]
            options = REGISTRY[cfg.optim.name].kept_options(options, saved)
        if options.get("schedule", "constant") != "constant":
            options.setdefault("total_steps", cfg.steps)
        shards, shard_comm = self.backend.shards(self.model, torch.float32 if cfg.model.master_weights else None)
        self.optimizer = zoscale.build_optimizer(cfg.optim.name, shards, comm=self.comm, shard_comm=shard_comm,
                                                 **options)
        self.optimizer.engine.journal = []
        self.owns_shards = shard_comm.distributed or self.comm.is_main  # replicas: rank 0 writes checkpoints

        self.step = 0
        self.forward_passes = 0.0  # over one training batch each, since step 0
        self.consecutive_nonfinite = self.total_nonfinite = 0
        self.best: dict | None = None
        self.history: dict = {}
        self.last_checkpoint: Path | None = None
        if resume:
            self._resume()
        elif self.comm.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            header = {"stream": self.optimizer.config.stream, "distribution": self.optimizer.config.distribution}
            (run_dir / "seeds.jsonl").write_text(json.dumps({"header": header}) + "\n")
        self.writer = self._tensorboard() if cfg.tensorboard else None
        self.memory = None
        if cfg.memory_profile:
            self.memory = MemorySampler(cfg.memory_interval_s).start()
            self.optimizer.engine.phase = self.memory.phase
            if self.memory.nvml_missing:
                print0(f"memory: no NVML ({self.memory.nvml_missing}); recording host and allocator memory only")

    def phase(self, name: str):
        return self.memory.phase(name) if self.memory is not None else contextlib.nullcontext()

    # -- the step -------------------------------------------------------------------------------
    def batch(self, step: int) -> Batch:
        index = data.batch_indices(len(self.train), self.cfg.batch_size, step, self.cfg.seed)
        mine = data.rank_share(index, self.comm.rank, self.comm.world_size)
        # every rank pads like the whole batch: the same shapes as in one process (PseuZO pairs
        # positions of older outputs by them)
        longest = max(sequence_length(self.train[i], self.objective) for i in index)
        return self._batch([self.train[i] for i in mine], pad_to=longest)

    def _batch(self, examples, pad_to: int = 0) -> Batch:
        return Batch(examples, self.objective, self.tokenizer.pad_token_id, self.device,
                     body=self.backend.body, head=self.backend.head, pad_to=pad_to, mask_id=self.mask_id)

    def full_batch_loss(self) -> tuple[float, int]:
        """MeZO-SVRG's anchor loss: this rank's share of the whole training sample."""
        mine = data.rank_share(list(range(len(self.train))), self.comm.rank, self.comm.world_size)
        total = count = 0
        for start in range(0, len(mine), self.cfg.eval_batch_size):
            chunk = [self.train[i] for i in mine[start : start + self.cfg.eval_batch_size]]
            s, c = self._batch(chunk).loss(self.model)
            total, count = total + s, count + c
        return total, count

    def objective_for(self, batch: Batch) -> Objective:
        """Everything an optimizer's step may ask for (it calls only what its ``needs`` name; a
        masked LM offers no body/head split, which the config refuses before anything is built).
        Each call is counted in forward passes over one training batch (``forward_passes``)."""
        def forward(fn, passes: float = 1.0):
            def run(*args):
                self.forward_passes += passes
                with self.phase("forward"):
                    return fn(*args)
            return run

        model = self.model
        outputs = None if self.objective == "masked" else forward(lambda kind: batch.outputs(model, kind))
        return Objective(loss=forward(lambda: batch.loss(model)),
                         full_loss=forward(self.full_batch_loss, len(self.train) / self.cfg.batch_size),
                         outputs=outputs)

    def train_step(self, batch: Batch):
        return self.optimizer.step(self.objective_for(batch))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        start_time = time.time()
        if self.step == 0 and cfg.eval_before:
            self.history["eval_before"] = self.evaluate("test")
            print0(f"before training: test {self._fmt(self.history['eval_before'])}")
        bar = tqdm(range(self.step, cfg.steps), initial=self.step, total=cfg.steps, desc=cfg.optim.name,
                   unit="step", disable=not self.comm.is_main, mininterval=1.0)
        with StopRequest() as stop:
            for step in bar:
                batch = self.batch(step)
                t0 = time.time()
                result = self.train_step(batch)
                elapsed = time.time() - t0
                if cfg.check_sync:
                    self.comm.assert_same((result.projected_grads, result.lr, result.skipped), f"step {step}'s update")
                self.step = step + 1
                self._check_update(step)
                self._log_step(result, elapsed, batch)
                if result.skipped:
                    self._count_nonfinite(step)
                else:
                    self.consecutive_nonfinite = 0
                if step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{result.loss:.4f}", pg=f"{result.projected_grad:+.3g}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._dev_eval()
                    if cfg.eval_test:  # a learning curve on test (the final one is the summary's)
                        self._write_metrics({"step": self.step, "split": "test", **self.evaluate("test")})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
                # one all-reduce a step in a sharded or data-parallel run: every rank stops at the same step
                if self.step < cfg.steps and self.comm.all_reduce_sum([float(stop.received is not None)])[0]:
                    bar.close()
                    self.save()
                    raise Preempted(f"stopped by {stop.name or 'a signal on another rank'} at step {self.step}; "
                                    f"{self.last_checkpoint.name} written; continue with: zoscale train --resume "
                                    f"{self.run_dir}")
        bar.close()
        self._dev_eval()
        self.save()
        return self._finish(time.time() - start_time)

    def _finish(self, seconds: float) -> dict:
        summary = {"steps": self.step, "optimizer": self.cfg.optim.name, "task": self.task.name,
                   "seconds": seconds, "forward_passes": self.forward_passes, "nonfinite_steps": self.total_nonfinite, **parameter_stats(self.optimizer)}
        summary["eval_final"] = self.evaluate("test")
        summary["eval_after"] = summary["eval_final"]
        if self.best is not None:
            summary["best_dev"] = self.best
            if self.best["step"] != self.step:  # else the final parameters are the best: evaluated already
                best = checkpoint.find(self.run_dir / "best", self.comm).path
                if best is None:
                    print0(f"{self.run_dir / 'best'} holds no complete checkpoint: test reports the final parameters")
                else:
                    checkpoint.read_shards(best, self.optimizer.shards)
                    summary["eval_after"] = self.evaluate("test")  # MeZO reports the best dev checkpoint on test
                    # back to the final parameters, from the checkpoint just written
                    checkpoint.read_shards(self.last_checkpoint, self.optimizer.shards)
        summary.update({k: v for k, v in self.history.items() if k == "eval_before"})
        if self.memory is not None:  # after the last evaluations, so their peaks count too
            self.memory.stop()
            summary["memory"] = self.memory.summary()
        if self.comm.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        before = self._fmt(summary["eval_before"]) if "eval_before" in summary else "-"
        after = self._fmt(summary["eval_after"])
        print0(f"done: {self.step} steps in {seconds:.0f} s; test before {before}, after {after}")
        return summary

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        self.optimizer.flush()
        examples = {"dev": self.dev, "test": self.test}[split]
        mine = data.rank_share(examples, self.comm.rank, self.comm.world_size)
        with self.phase("evaluation"):
            return self._evaluate(mine)

    def _evaluate(self, mine) -> dict[str, float]:
        return evaluate(self.model, self.tokenizer, mine, self.task.evaluation, self.cfg.eval_batch_size,
                        self.tokenizer.pad_token_id, self.device, self.comm, self.cfg.data.max_new_tokens,
                        body=self.backend.body, head=self.backend.head, mask_id=self.mask_id)

    def _dev_eval(self) -> None:
        if not self.dev:
            return
        metrics = self.evaluate("dev")
        self._write_metrics({"step": self.step, "split": "dev", **metrics})
        if self.best is None or headline(metrics) > self.best["score"]:
            self.best = {"step": self.step, "score": headline(metrics), **metrics}
            checkpoint.save_best(self.run_dir, self.step, self.optimizer.shards, self.comm, self.owns_shards)

    # -- logging and checkpoints --------------------------------------------------------------------
    def _log_step(self, result, elapsed: float, batch: Batch) -> None:
        tokens = int(batch.attention_mask.sum()) * 2  # two forwards per step
        memory = {}
        if self.memory is not None:
            latest = self.memory.sample()
            memory = {f"memory/{k}_gib": v / 2**30 for k, v in latest.items() if k not in ("t", "phase")}
        self._write_metrics({"step": result.step, "loss": result.loss, "projected_grad": result.projected_grad,
                             "lr": result.lr, "step_time": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
                             "forward_passes": self.forward_passes, "skipped": result.skipped, **memory})
        journal = self.optimizer.engine.journal
        if self.comm.is_main:
            with open(self.run_dir / "seeds.jsonl", "a") as f:
                entry = {"step": result.step, "projected_grads": list(result.projected_grads),
                         "updates": [None if u is None else {"terms": [[s, c] for s, c in u[0].items()], "decay": u[1]}
                                     for u in journal]}
                f.write(json.dumps(entry) + "\n")
        journal.clear()

    def _write_metrics(self, record: dict) -> None:
        if not self.comm.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = f"{record.get('split', 'train')}/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(prefix + key, value, record["step"])

    def _count_nonfinite(self, step: int) -> None:
        self.consecutive_nonfinite += 1
        self.total_nonfinite += 1
        self._check_parameters(step, "after a non-finite loss")
        if self.cfg.max_nonfinite and self.consecutive_nonfinite > self.cfg.max_nonfinite:
            self._diverged(f"{self.consecutive_nonfinite} consecutive non-finite losses up to step {step}")

    def _check_update(self, step: int) -> None:
        """An update with a non-finite coefficient (lr=inf, say) poisons every parameter: stop before it spreads."""
        for update in self.optimizer.engine.journal:
            if update is not None and not all(math.isfinite(c) for c in [*update[0].values(), update[1]]):
                self._diverged(f"step {step}'s update has a non-finite coefficient (lr {self.optimizer.lr_at(step)})")

    def _check_parameters(self, step: int, when: str) -> None:
        """One read of the shards (no write): every rank learns whether any element anywhere is non-finite."""
        self.optimizer.flush()
        bad = 0.0
        for batch in resident(self.optimizer.shards):
            bad += sum(float(not torch.isfinite(s.tensor).all()) for s in batch)
        if self.optimizer.param_sums([bad])[0]:
            self._diverged(f"parameters are non-finite at step {step} ({when})")

    def _diverged(self, what: str) -> None:
        """Back to the last checkpoint's parameters, and stop: nothing non-finite is ever saved."""
        self.optimizer.flush()
        if self.last_checkpoint is not None:
            checkpoint.read_shards(self.last_checkpoint, self.optimizer.shards, self.optimizer.shard_buffers())
            where = f"the last checkpoint, {self.last_checkpoint.name}, holds finite parameters and is restored"
        else:
            where = "no checkpoint had been written"
        raise NonFiniteLossError(f"{what}; stopped, {where} (try a lower optim.lr)")

    def save(self) -> None:
        self._check_parameters(self.step - 1, "before a checkpoint")
        state = self.optimizer.state_dict(buffers=False)  # flushes; the buffers go with the shards
        trainer_state = {"consecutive_nonfinite": self.consecutive_nonfinite, "config": to_dict(self.cfg),
                         "forward_passes": self.forward_passes,
                         "total_nonfinite": self.total_nonfinite, "best": self.best, "history": self.history}
        self.last_checkpoint = checkpoint.save(self.run_dir, self.step, self.optimizer.shards,
                                               self.optimizer.shard_buffers(), state, trainer_state, self.comm,
                                               self.owns_shards, self.cfg.keep_checkpoints)

    def _checkpoint_to_resume(self) -> Path:
        """The newest complete checkpoint, chosen (and its checksums verified) before any model is built."""
        found = checkpoint.find(self.run_dir / "checkpoints", self.comm)
        if found.skipped:
            print0(f"--resume: {found.describe()}")
        if found.path is None:
            raise ConfigError(f"--resume: {self.run_dir} has no complete checkpoint")
        saved = json.loads((found.path / "trainer.json").read_text())
        if self.cfg.steps <= saved["step"]:
            raise ConfigError(f"--resume: {self.run_dir} is at step {saved['step']} already ({found.path.name}); "
                              f"--steps must be larger to continue it (nothing was changed)")
        before, now = saved.get("config"), to_dict(self.cfg)
        for key in TRAJECTORY_KEYS if before is not None else ():
            if before[key] != now[key]:
                raise ConfigError(f"--resume: {key} in {self.run_dir / 'config.yaml'} differs from what "
                                  f"{found.path.name} was trained with ({before[key]} -> {now[key]}); restore it, or "
                                  f"start a new run")
        return found.path

    def _resume(self) -> None:
        path = self.last_checkpoint = self.resume_from
        optimizer_state, trainer_state = checkpoint.load(path, self.comm)
        checkpoint.read_shards(path, self.optimizer.shards, self.optimizer.shard_buffers())
        self.optimizer.load_state_dict(optimizer_state)
        self.step = trainer_state["step"]
        self.consecutive_nonfinite = trainer_state["consecutive_nonfinite"]
        self.total_nonfinite = trainer_state["total_nonfinite"]
        self.forward_passes = trainer_state.get("forward_passes", 0.0)  # checkpoints of 2026-12-02 and before: none
        self.best, self.history = trainer_state["best"], trainer_state["history"]
        if self.comm.is_main:  # drop what was logged after the checkpoint: those steps run again
            for name in ("metrics.jsonl", "seeds.jsonl"):
                _truncate_log(self.run_dir / name, self.step)
        print0(f"resumed {self.run_dir} at step {self.step} ({path.name})")

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self.run_dir / "tensorboard") if self.comm.is_main else None

    @staticmethod
    def _fmt(metrics: dict) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "examples")


def _truncate_log(path: Path, step: int) -> None:
    """Keep what was logged before the checkpoint; a torn last line (a kill or a full disk mid-append) is dropped."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ConfigError(f"--resume: {path} line {number} is not valid JSON (only a torn last line is "
                                  f"dropped)") from None
            print0(f"--resume: dropped a torn last line of {path}")
    keep = [line for line, r in records
            if "step" not in r or r["step"] < step or (r.get("split") and r["step"] <= step)]  # a header stays
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def resumed_config(run_dir: Path, steps: int | None, backend: str | None = None) -> TrainConfig:
    """The run's config; the step target and the backend may change (checkpoints hold pieces keyed
    by flat offset, so any backend and world size can continue them)."""
    from zoscale.config import load

    cfg = load(run_dir / "config.yaml")
    return replace(cfg, steps=steps or cfg.steps, backend=backend or cfg.backend)

