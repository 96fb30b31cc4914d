"""`zoscale train`: the loop. Read top to bottom: setup, the step, logging, evaluation, checkpoints.

Run directory: what runlog.py writes (config.yaml, metrics.jsonl, seeds.jsonl, summary.json), and
checkpoints/ (resumable state, written atomically; best/ holds the best dev parameters).

Collectives the loop issues itself: none in the step but the optimizer's (its loss all-reduce); one
all-reduce of the stop flag after each step in runs of several ranks; the evaluations' sums.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import zoscale
from zoscale import backends
from zoscale.config import TrainConfig, to_dict
from zoscale.engine import resident
from zoscale.engine.comm import print0
from zoscale.engine.dual import DualForward
from zoscale.engine.ledger import CommLedger
from zoscale.errors import ConfigError
from zoscale.models import BodyHead, build_tokenizer
from zoscale.optim import REGISTRY
from zoscale.optim.base import Objective
from zoscale.train import checkpoint, data, gguf, objectives, tasks
from zoscale.train import resume as resume_run
from zoscale.train.evaluate import evaluate, headline, headline_key, rank_batches
from zoscale.train.frozen_layers import FrozenLayers, shared_store
from zoscale.train.losses import Batch, sequence_length
from zoscale.train.memory import MemorySampler
from zoscale.train.runlog import RunLog
from zoscale.train.signals import StopRequest
from zoscale.train.stall import StallWatch


class NonFiniteLossError(RuntimeError):
    """Training diverged: the run stopped without saving non-finite parameters (the message is one line)."""


class Preempted(RuntimeError):
    """A stop signal ended the run at a step boundary, after a checkpoint."""


def parameter_stats(optimizer) -> dict[str, float]:
    """Global statistics of the trainable parameters (float64, over every rank's shards)."""
    local = [0.0, 0.0]
    for batch in resident([s for s in optimizer.shards if s.primary]):
        local[0] += sum(s.tensor.double().sum().item() for s in batch)
        local[1] += sum(s.tensor.double().pow(2).sum().item() for s in batch)
    total, squares = optimizer.param_sums(local)
    return {"param_sum": total, "param_sq_sum": squares}


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False, auto_resume: bool = False):
        """``resume``: continue run_dir from its newest complete checkpoint (``auto_resume``: a
        requeued job, for which a complete run raises ``RunComplete``)."""
        self.cfg, self.run_dir = cfg, run_dir
        self.backend = backends.get(cfg.backend, cfg.deepspeed_config, cfg.fsdp_compute_dtype, cfg.fsdp_cpu_offload,
                                    cfg.fsdp_shard_size, cfg.zero3_shard_size, cfg.replicate_small_params)
        self.comm, self.device = self.backend.setup(cfg.collective_timeout_s)
        try:
            self.resume_point = resume_run.find_point(run_dir, cfg, self.comm, auto_resume) if resume else None
        except resume_run.RunComplete:
            self.backend.teardown()
            raise
        try:
            self.task = tasks.get(cfg.data.task)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        masked = cfg.model.kind == "masked"
        if masked and (self.task.train_objective != "classification" or self.task.evaluation != "candidates"):
            raise ConfigError(f"model.kind: masked LMs score candidates at a mask; task {self.task.name} is not a "
                              f"classification task")
        objectives.check_task(cfg.objective, self.task)
        if cfg.batch_size < self.comm.world_size:
            raise ConfigError(f"batch_size: {cfg.batch_size} is smaller than the {self.comm.world_size} ranks; every "
                              f"rank needs a share of each batch")
        self.loss_kind = "masked" if masked else self.task.train_objective
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
        # a sharded forward is a collective: ranks run equally many (generation included)
        self.sharded = self.backend.sharded and self.comm.world_size > 1
        self.measure = objectives.Measure.of(cfg.objective, self.tokenizer, self.device, synced=self.sharded)

        self.model = self.backend.build(self.model_config, len(self.tokenizer), self.device)
        self.split = self._frozen_split() if cfg.model.cache_frozen_layers else self.backend.split
        options = {"seed": cfg.seed, **cfg.optim.options}
        if self.resume_point is not None:  # run properties (stream, momentum dtype) stay what the run began with
            options = REGISTRY[cfg.optim.name].kept_options(options, self.resume_point.optimizer_state["config"])
        if options.get("schedule", "constant") != "constant":
            options.setdefault("total_steps", cfg.steps)
        self.memory = None  # a MemorySampler, when profiling: the engine's passes and the forwards tag its peaks
        shards, shard_comm = self.backend.shards(self.model, torch.float32 if cfg.model.master_weights else None)
        self.optimizer = zoscale.build_optimizer(cfg.optim.name, shards, comm=self.comm, shard_comm=shard_comm,
                                                 phase=self.phase, **options)
        self.ledger = CommLedger(self.comm.world_size, self.backend.named_groups())
        self.dual = DualForward(self.model, self.optimizer.config.distribution, self.optimizer.config.stream) \
            if cfg.dual_forward else None

        self.step = 0
        self.forward_passes = 0.0  # over one training batch each, since step 0
        self.consecutive_nonfinite = self.total_nonfinite = 0
        self.stall = StallWatch(cfg.max_stalled_steps, same_values=not self.measure.discrete)
        self.best: dict | None = None
        self.history: dict = {}
        self.last_checkpoint: Path | None = None
        self.log = RunLog(run_dir, self.comm.is_main, cfg.tensorboard)
        if self.resume_point is not None:
            self._resume(self.resume_point)
        else:
            header = {"stream": self.optimizer.config.stream, "distribution": self.optimizer.config.distribution}
            self.log.start(to_dict(cfg), header)
        if cfg.memory_profile:
            self.memory = MemorySampler(cfg.memory_interval_s).start()
            if self.memory.nvml_missing:
                print0(f"memory: no NVML ({self.memory.nvml_missing}); recording host and allocator memory only")

    def _frozen_split(self) -> BodyHead:
        frozen = FrozenLayers(self.model, shared_store())
        start = time.time()
        examples = self.train + self.dev + self.test
        packed = (Batch(examples[i:i + 64], self.loss_kind, self.tokenizer.pad_token_id, self.device)
                  for i in range(0, len(examples), 64))
        frozen.fill([tuple(ids[:n].tolist()) for b in packed for ids, n in zip(b.input_ids, b.attention_mask.sum(1))])
        sample = Batch(self.train[:2], self.loss_kind, self.tokenizer.pad_token_id, self.device)
        frozen.check(sample.input_ids, sample.attention_mask)
        print0(f"model.cache_frozen_layers: decoder layers 0-{frozen.frozen - 1} of {len(frozen.layers)} run once "
               f"per example: {len(frozen.entries)} sequences in {time.time() - start:.0f} s")
        return frozen.split

    def phase(self, name: str):
        return self.memory.phase(name) if self.memory is not None else contextlib.nullcontext()

    # -- the step -------------------------------------------------------------------------------
    def batch(self, step: int) -> Batch:
        index = data.batch_indices(len(self.train), self.cfg.batch_size, step, self.cfg.seed)
        share = self.optimizer.batch_comm  # every rank, or (a population) the rank's shard group
        mine = data.rank_share(index, share.rank, share.world_size)
        # every rank pads like the whole batch: the same shapes as in one process (PseuZO pairs
        # positions of older outputs by them)
        longest = max(sequence_length(self.train[i], self.loss_kind) for i in index)
        return self.pack([self.train[i] for i in mine], pad_to=longest)

    def pack(self, examples, pad_to: int = 0) -> Batch:
        """Encoded examples as a Batch for this model and backend."""
        return Batch(examples, self.loss_kind, self.tokenizer.pad_token_id, self.device, split=self.split,
                     pad_to=pad_to, mask_id=self.mask_id)

    def full_batch_loss(self) -> tuple[float, int]:
        """MeZO-SVRG's anchor: the objective over this rank's share of the whole training sample."""
        mine = data.rank_share(self.train, self.comm.rank, self.comm.world_size)
        total = count = 0
        for chunk, counts in rank_batches(mine, self.cfg.eval_batch_size, self.fillers(self.train)):
            s, c = self.measure.value(self.model, self.pack(chunk))
            if counts:
                total, count = total + s, count + c
        return total, count

    def fillers(self, examples: list) -> tuple[int, object] | None:
        """When forwards are collectives: (the largest rank's share of ``examples``, an example to
        forward in a missing batch's place), as evaluate.rank_batches takes them."""
        if not (self.sharded and examples):
            return None
        return math.ceil(len(examples) / self.comm.world_size), examples[0]

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
        outputs = None if self.loss_kind == "masked" else forward(lambda kind: batch.outputs(model, kind))
        pair = None if self.dual is None else forward(lambda terms: batch.pair_loss(model, self.dual, terms), 2.0)
        return Objective(loss=forward(lambda: self.measure.value(model, batch)),
                         full_loss=forward(self.full_batch_loss, len(self.train) / self.cfg.batch_size),
                         outputs=outputs, gradient=forward(lambda: batch.backward(model), 3.0), pair=pair)

    def train_step(self, batch: Batch):
        return self.optimizer.step(self.objective_for(batch))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        start_time = time.time()
        trained = self.step < cfg.steps
        if self.step == 0 and cfg.eval_before:
            self.history["eval_before"] = self.evaluate("test")
            print0(f"before training: test {self._fmt(self.history['eval_before'])}")
        bar = tqdm(range(self.step, cfg.steps), initial=self.step, total=cfg.steps, desc=cfg.optim.name,
                   unit="step", disable=not self.comm.is_main, mininterval=1.0)
        with StopRequest() as stop:
            for step in bar:
                batch = self.batch(step)
                t0 = time.time()
                if self.dual is not None:
                    self.dual.generated = 0  # the ledger reports one step's
                with self.counting(step):
                    result = self.train_step(batch)
                elapsed = time.time() - t0
                if cfg.check_sync:
                    self.comm.assert_same((result.projected_grads, result.lr, result.skipped), f"step {step}'s update")
                self.step = step + 1
                self._check_update(step, result)
                self._log_step(result, elapsed, batch)
                warning = self.stall.observe(result)
                if warning:
                    print0(warning)
                if result.skipped:
                    self._count_nonfinite(step)
                else:
                    self.consecutive_nonfinite = 0
                if step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{result.loss:.4f}", pg=f"{result.projected_grad:+.3g}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._dev_eval()
                    if cfg.eval_test:  # a learning curve on test (the final one is the summary's)
                        self.log.metrics({"step": self.step, "split": "test", **self.evaluate("test")})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
                # one all-reduce a step in a sharded or data-parallel run: every rank stops at the same step
                with self.counting(step):
                    stopping = self.step < cfg.steps and self.comm.all_reduce_sum([float(stop.received is not None)])[0]
                if step + 1 == min(cfg.comm_ledger_steps, cfg.steps):
                    self._write_ledger(step)
                if stopping:
                    bar.close()
                    self.save()
                    raise Preempted(f"stopped by {stop.name or 'a signal on another rank'} at step {self.step}; "
                                    f"{self.last_checkpoint.name} written; continue with: zoscale train --resume "
                                    f"{self.run_dir}")
        bar.close()
        if trained:  # else a complete run whose summary is being written again: its last checkpoint stands
            self._dev_eval()
            self.save()
        return self._finish(time.time() - start_time)

    def counting(self, step: int):
        """The communication ledger's record of ``step``, for the first ``comm_ledger_steps``."""
        return self.ledger.record(step) if step < self.cfg.comm_ledger_steps else contextlib.nullcontext()

    def _write_ledger(self, step: int) -> None:
        record = self.ledger.as_dict()
        if self.dual is not None:  # the work dual_forward adds: every rank draws z for whole gathered parameters
            record["dual_forward"] = {"z_elements_per_step": self.dual.generated,
                                      "shard_elements": sum(s.numel for s in self.optimizer.shards)}
        self.log.comm(record)
        print0(f"communication of step {step} (rank 0; RUN/comm.json): {self.ledger.summary(step)}")

    def _finish(self, seconds: float) -> dict:
        summary = {"steps": self.step, "optimizer": self.cfg.optim.name, "task": self.task.name,
                   "objective": self.cfg.objective.name, "seconds": seconds, "forward_passes": self.forward_passes,
                   "nonfinite_steps": self.total_nonfinite, **parameter_stats(self.optimizer)}
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
        self.log.summary(summary)
        before = self._fmt(summary["eval_before"]) if "eval_before" in summary else "-"
        after = self._fmt(summary["eval_after"])
        print0(f"done: {self.step} steps in {seconds:.0f} s; test before {before}, after {after}")
        if "eval_before" in summary and headline(summary["eval_after"]) < headline(summary["eval_before"]):
            key = headline_key(summary["eval_after"])
            print0(f"note: the test {key} ended below where it started ({headline(summary['eval_after']):.3f} < "
                   f"{headline(summary['eval_before']):.3f}): training made the model worse; if its loss rose "
                   f"too, try a lower optim.lr")
        return summary

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        self.optimizer.flush()
        examples = {"dev": self.dev, "test": self.test}[split]
        mine = data.rank_share(examples, self.comm.rank, self.comm.world_size)
        sharded = self.fillers(examples)
        with self.phase("evaluation"):
            metrics = evaluate(self.model, self.tokenizer, mine, self.task.evaluation, self.cfg.eval_batch_size,
                               self.tokenizer.pad_token_id, self.device, self.comm, self.cfg.data.max_new_tokens,
                               split=self.split, mask_id=self.mask_id, sharded=sharded)
            if self.measure.rewards:
                metrics["reward"] = self.measure.mean_reward(self.model, mine, self.cfg.eval_batch_size, self.comm,
                                                             sharded)
        return metrics

    def _dev_eval(self) -> None:
        if not self.dev:
            return
        metrics = self.evaluate("dev")
        self.log.metrics({"step": self.step, "split": "dev", **metrics})
        if self.best is None or headline(metrics) > self.best["score"]:
            self.best = {"step": self.step, "score": headline(metrics), **metrics}
            checkpoint.save_best(self.run_dir, self.step, self.optimizer.shards, self.comm, self.optimizer.writes_pieces)

    # -- logging and checkpoints --------------------------------------------------------------------
    def _log_step(self, result, elapsed: float, batch: Batch) -> None:
        tokens = int(batch.attention_mask.sum()) * 2  # two forwards per step
        memory = {}
        if self.memory is not None:
            latest = self.memory.sample()
            memory = {f"memory/{k}_gib": v / 2**30 for k, v in latest.items() if k not in ("t", "phase")}
        self.log.metrics({"step": result.step, "loss": result.loss, "projected_grad": result.projected_grad,
                          "lr": result.lr, "step_time": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
                          "forward_passes": self.forward_passes, "skipped": result.skipped, **memory})
        self.log.seeds(result.step, result.projected_grads, result.updates)

    def _count_nonfinite(self, step: int) -> None:
        self.consecutive_nonfinite += 1
        self.total_nonfinite += 1
        self._check_parameters(step, "after a non-finite loss")
        if self.cfg.max_nonfinite and self.consecutive_nonfinite > self.cfg.max_nonfinite:
            self._diverged(f"{self.consecutive_nonfinite} consecutive non-finite losses up to step {step}")

    def _check_update(self, step: int, result) -> None:
        """An update with a non-finite coefficient (lr=inf, say) poisons every parameter: stop before it spreads."""
        for update in result.updates:
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
                         "consecutive_stalled": self.stall.count,
                         "forward_passes": self.forward_passes,
                         "total_nonfinite": self.total_nonfinite, "best": self.best, "history": self.history}
        self.last_checkpoint = checkpoint.save(self.run_dir, self.step, self.optimizer.shards,
                                               self.optimizer.shard_buffers(), state, trainer_state, self.comm,
                                               self.optimizer.writes_pieces, self.cfg.keep_checkpoints)

    def _resume(self, point: resume_run.ResumePoint) -> None:
        self.last_checkpoint = point.path
        checkpoint.read_shards(point.path, self.optimizer.shards, self.optimizer.shard_buffers())
        self.optimizer.load_state_dict(point.optimizer_state)
        state = point.trainer_state
        self.step = state["step"]
        self.consecutive_nonfinite, self.total_nonfinite = state["consecutive_nonfinite"], state["total_nonfinite"]
        self.stall.count = state.get("consecutive_stalled", 0)
        self.forward_passes = state.get("forward_passes", 0.0)
        self.best, self.history = state["best"], state["history"]
        self.log.resume(self.step)
        print0(f"resumed {self.run_dir} at step {self.step} ({point.path.name})")

    @staticmethod
    def _fmt(metrics: dict) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "examples")

