"""What every ZO optimizer shares: config, registry, seeds, the lr schedule and the loss reduction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from zoscale.engine import PerturbationEngine, Shard, ShardBuffer, rng
from zoscale.engine.comm import Comm
from zoscale.errors import ConfigError
from zoscale.optim.schedule import SCHEDULES, lr_at

# closure() returns this rank's loss: a scalar (ranks are averaged) or a (loss_sum, count) pair
# (summed over ranks, then divided, so uneven token counts give the true global mean).
Closure = Callable[[], "float | torch.Tensor | tuple"]


@dataclass(frozen=True)
class Objective:
    """The closure protocol: what a trainer offers an optimizer's step, as callables over this
    rank's share of the step's batch. Each optimizer names the ones it calls in ``needs``, so a
    trainer can refuse what it cannot offer before training; the trainer itself names no optimizer.

    loss()          the loss at the current parameters, under no_grad: a scalar or (loss_sum, count)
    full_loss()     the same over the fixed full training sample (MeZO-SVRG's anchor steps)
    outputs(kind)   (output, head_loss) for a body/head split (PseuZO): ``output`` is the body's
                    output under no_grad, ``kind`` "hidden" (the head's input) or "logits" (the
                    head's output, (batch, position, vocab)); ``head_loss(output)`` is the loss,
                    differentiable with respect to ``output``
    gradient()      the loss (loss_sum, count) with the loss_sum's gradient accumulated into the
                    trainable parameters' ``.grad``: backpropagation, for first-order baselines
    pair(terms)     [loss at theta + terms, loss at theta - terms] from one forward that perturbs
                    gathered copies and never the shards (``dual_forward``, engine/dual.py); offered
                    by a trainer only when asked for, and used by the optimizers that declare
                    ``pairs`` in place of two ``loss()`` calls around engine passes
    """

    loss: Closure | None = None
    full_loss: Closure | None = None
    outputs: Callable[[str], tuple] | None = None
    gradient: Closure | None = None
    pair: Callable[[dict], list] | None = None

    def require(self, optimizer: ZOOptimizer) -> Objective:
        absent = [need for need in optimizer.needs if getattr(self, need) is None]
        if absent:
            raise ValueError(f"{optimizer.name} needs the objective's {' and '.join(absent)}")
        return self


def as_objective(closure, role: str) -> Objective:
    """A bare callable stands for the objective field ``role`` (the optimizer's first need)."""
    if closure is None or isinstance(closure, Objective):
        return closure or Objective()
    if role == "outputs":  # the direct API's PseuZO closure takes no kind: it returns its output
        return Objective(outputs=lambda kind: closure())
    return Objective(**{role: closure})


@dataclass
class ZOConfig:
    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    distribution: str = "gaussian"  # gaussian | rademacher
    stream: str = "v1"  # the perturbation stream's version (rng.py): v2 uses every bit of each Philox call
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    total_steps: int | None = None  # needed by linear and cosine
    min_lr_ratio: float = 0.0
    seed: int = 0  # run seed: step seeds are derived from it, identically on every rank

    def __post_init__(self):
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(self.lr >= 0, "lr", f"must be >= 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.distribution in rng.DISTRIBUTIONS, "distribution",
               f"must be one of {list(rng.DISTRIBUTIONS)}, got {self.distribution!r}")
        _check(self.stream in rng.STREAMS, "stream", f"must be one of {list(rng.STREAMS)}, got {self.stream!r}")
        _check(self.schedule in SCHEDULES, "schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.schedule == "constant" or (self.total_steps or 0) > self.warmup_steps, "total_steps",
               f"must exceed warmup_steps for the {self.schedule} schedule, got {self.total_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


@dataclass(frozen=True)
class StepResult:
    step: int  # the step this result belongs to (0-based)
    loss: float  # global mean loss at theta + eps z (mean over directions)
    projected_grad: float  # mean over directions
    projected_grads: tuple[float, ...]
    lr: float
    skipped: bool = False  # a non-finite loss: parameters restored, no update
    # the updates the step applied, as (seed terms, decay), or None for one that used a buffer:
    # what the seed log records and `zoscale replay` applies
    updates: tuple = ()


REGISTRY: dict[str, type[ZOOptimizer]] = {}


def optimizer_config(name: str, options: dict, prefix: str = "") -> ZOConfig:
    """The registered optimizer ``name``'s config dataclass from its options, each value checked
    against its field's type: the one validator of optimizer options (``zoscale train``'s config,
    ``build_optimizer`` and ZOTrainer). A ``ConfigError`` names the key, after ``prefix``."""
    if name not in REGISTRY:
        raise ConfigError(f"{prefix}name: unknown optimizer {name!r}; choose one of {sorted(REGISTRY)}")
    cls = REGISTRY[name].Config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        section = f"{prefix.rstrip('.')}: " if prefix else ""
        raise ConfigError(f"{section}unknown option(s) {unknown} for {name}; valid: {sorted(fields)}")
    values = {k: coerce(v, fields[k].type, f"{prefix}{k}") for k, v in options.items()}
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def coerce(value, annotation, key: str):
    """Integers where floats are expected (lr: 1), lists where tuples are (beta_warmup: [200, 2000]);
    a string or a boolean where a number belongs is an error naming the key."""
    text = str(annotation)
    if isinstance(value, str) and "str" in text:
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if text.startswith(("float", "int")) and not number and not (value is None and "None" in text):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if text.startswith("int") and isinstance(value, float):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if text.startswith("bool") and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if number and text.startswith("float"):
        return float(value)
    if isinstance(value, list) and "tuple" in text:
        return tuple(value)
    return value


def register(name: str):
    def add(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add


class ZOOptimizer:
    """Base class: ``step(closure)`` perturbs through the engine and reduces losses through comm."""

    name = "base"
    Config = ZOConfig
    needs: tuple[str, ...] = ("loss",)  # the Objective fields a step calls; a bare callable is the first
    pairs = False  # whether its step's losses are (+, -) pairs around theta that Objective.pair may give
    # Options a run keeps from its first step: a resumed run not naming them takes its checkpoint's
    # values, so that a default changed since does not change the run (states without "stream": v1)
    run_properties: tuple[str, ...] = ("stream",)

    @classmethod
    def kept_options(cls, options: dict, saved_config: dict) -> dict:
        """``options`` with the run properties it does not name taken from a checkpoint's config."""
        kept = {key: saved_config.get(key, "v1" if key == "stream" else None) for key in cls.run_properties}
        return {**{k: v for k, v in kept.items() if v is not None}, **options}

    def __init__(self, shards: Sequence[Shard], config: ZOConfig, comm: Comm | None = None,
                 shard_comm: Comm | None = None, phase: Callable | None = None):
        """``comm`` reduces losses over every data-parallel rank; ``shard_comm`` reduces sums over
        parameter elements (norms, dot products) over the ranks that hold *different* pieces:
        the world under FSDP/ZeRO-3, a single process when every rank holds whole parameters.
        Left out, it is the single process when every rank's shards are whole parameters (one
        all-reduce decides), else ``comm``. ``phase(name)``: a context around each pass (a
        MemorySampler's, to tag its peaks)."""
        self.config = config
        self.comm = comm or Comm()
        if shard_comm is None:  # replicas hold every element on every rank: their sums are not added up
            whole = all(s.offset == 0 and s.numel == s.global_numel for s in shards)
            sharded = self.comm.all_reduce_sum([0.0 if whole else 1.0])[0] > 0  # every rank decides the same
            shard_comm = self.comm if sharded else Comm(distributed=False)
        self.shard_comm = shard_comm
        self.batch_comm = self.comm  # the ranks a step's batch is split over
        self.engine = PerturbationEngine(shards, config.distribution, version=config.stream, phase=phase)
        self.step_count = 0
        self.lr_source: Callable[[int], float] | None = None  # an outside schedule (a Trainer's) replaces lr_at's

    @property
    def shards(self) -> list[Shard]:
        return self.engine.shards

    def lr_at(self, step: int) -> float:
        if self.lr_source is not None:
            return self.lr_source(step)
        c = self.config
        return lr_at(step, lr=c.lr, schedule=c.schedule, warmup_steps=c.warmup_steps,
                     total_steps=c.total_steps, min_lr_ratio=c.min_lr_ratio)

    def seed_for(self, step: int, *tags: int) -> int:
        return rng.mix_seed(self.config.seed, step, *tags)

    def evaluate_pairs(self, directions: Sequence[dict], closure: Closure, pair: Callable | None = None) -> list:
        """Closure results at theta + eps d and theta - eps d for each direction d (engine terms),
        in that order; theta - eps d_last stays pending until the next update/flush. With ``pair``
        (Objective.pair) each direction is one dual forward and the shards stay at theta."""
        eps, raw = self.config.eps, []
        if pair is not None:
            self.engine.flush()  # the gathered copies are perturbed from theta itself
            for direction in directions:
                raw.extend(pair({k: eps * c for k, c in direction.items()}))
            return raw
        for direction in directions:
            for sign in (1.0, -1.0):
                self.engine.perturb({k: sign * eps * c for k, c in direction.items()})
                raw.append(closure())
        return raw

    @property
    def writes_pieces(self) -> bool:
        """Whether this rank writes its shards into a checkpoint: the ranks of the first shard group
        (world ranks [0, size)), so every element is written once and replicas write one copy."""
        return self.comm.rank < self.shard_comm.world_size

    def param_sums(self, values: Sequence[float]) -> list[float]:
        """Per-rank partial sums over parameter elements -> global sums, in one all-reduce."""
        return self.shard_comm.all_reduce_sum(values)

    def global_means(self, losses: Sequence) -> list[float]:
        """Each rank's closure results -> global mean losses, in one all-reduce."""
        pairs = [_sum_count(v) for v in losses]
        totals = self.comm.all_reduce_sum([x for pair in pairs for x in pair])
        return [totals[2 * i] / totals[2 * i + 1] for i in range(len(pairs))]

    @classmethod
    def buffer_bytes(cls, config: ZOConfig, parameter_bytes: int) -> int:
        """Bytes of parameter-sized state per parameter element (``zoscale plan`` counts them)."""
        return 0

    @classmethod
    def forward_passes(cls, config: ZOConfig, step: int, full_batches: float) -> float:
        """Forward passes, each over one training batch, that step ``step`` spends (``full_batches``:
        the training sample's size in batches). `zoscale compare` plans equal budgets from it; the
        trainer counts what it runs (``forward_passes`` in metrics.jsonl) and the tests hold the two
        equal."""
        return 2.0

    def step(self, objective: Objective | Closure, *args) -> StepResult:
        """One step. ``objective``: an Objective with the fields in ``needs``, or a bare callable
        for the first of them. The result carries the updates the step applied."""
        result = self._step(objective, *args)
        updates, self.engine.journal = tuple(self.engine.journal), []
        return dataclasses.replace(result, updates=updates)

    def _step(self, objective, *args) -> StepResult:
        raise NotImplementedError

    def objective(self, objective) -> Objective:
        return as_objective(objective, self.needs[0]).require(self)

    def flush(self) -> None:
        """Apply any deferred update: call before evaluation, checkpointing and export."""
        self.engine.flush()

    def shard_buffers(self) -> dict[str, ShardBuffer]:
        """State laid out like the shards (fp32 master copies; momentum, anchor): checkpoints save
        it piece by piece beside the parameters and re-slice it for another layout."""
        return {"master": ShardBuffer([s.master for s in self.shards])} if self.engine.has_master else {}

    def state_dict(self, buffers: bool = True) -> dict:
        """Flushes first, so the parameters saved beside this state are the ones it describes.
        ``buffers=False`` leaves out the shard buffers (a checkpoint saves them sharded)."""
        self.flush()
        state = {"optimizer": self.name, "step": self.step_count, "config": dataclasses.asdict(self.config)}
        if buffers:
            state["buffers"] = {kind: [t.detach().clone() for t in b.tensors]
                                for kind, b in self.shard_buffers().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Without "buffers" in ``state``, the shard buffers must have been loaded in place already
        (``checkpoint.read_shards``)."""
        if state.get("optimizer") != self.name:
            raise ValueError(f"state is for optimizer {state.get('optimizer')!r}, not {self.name!r}")
        if state["config"]["seed"] != self.config.seed:
            raise ValueError(f"state was saved with seed {state['config']['seed']}, this run has {self.config.seed}")
        for key in self.run_properties:
            saved = state["config"].get(key, "v1" if key == "stream" else None)  # no stream recorded: v1
            if saved is not None and saved != getattr(self.config, key):
                raise ValueError(f"state was saved with {key} {saved}, this run uses {getattr(self.config, key)}: "
                                 f"a run keeps its {key} (pass {key}={saved!r})")
        self.flush()
        self.step_count = int(state["step"])
        for kind, buffer in self.shard_buffers().items() if "buffers" in state else ():
            saved = state["buffers"].get(kind)
            if saved is None or [t.shape for t in saved] != [t.shape for t in buffer.tensors]:
                raise ValueError(f"state has no {kind} buffer laid out like this optimizer's shards")
            for t, v in zip(buffer.tensors, saved):
                t.copy_(v)
        if self.engine.has_master:
            for s in self.shards:
                s.tensor.copy_(s.master)


def _sum_count(value) -> tuple[float, float]:
    if isinstance(value, tuple):
        total, count = value
        return float(total), float(count)
    return float(value), 1.0


def all_finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


SHAPINGS = ("none", "normalize", "centered_ranks")


def shape(values: Sequence[float], how: str) -> list[float]:
    """A step's objective values, reshaped as evolution strategies do before their differences are
    taken (docs/optimizers.md, "Shaping"): ``normalize`` subtracts the step's mean and divides by
    its standard deviation (all equal: all 0), ``centered_ranks`` replaces each value by its rank
    mapped onto [-0.5, 0.5] (ties share their mean rank). Non-finite values pass unchanged."""
    values = list(values)
    if how == "none" or not all_finite(values) or len(values) < 2:
        return values
    if how == "normalize":
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return [(v - mean) / std if std > 0 else 0.0 for v in values]
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):  # ties: the mean of the ranks they span
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2
        start = end + 1
    return [r / (len(values) - 1) - 0.5 for r in ranks]
