"""What a step minimizes (``objective:`` in the config): the task's loss, or a measured quantity.

loss            the task's differentiable loss (losses.py)
accuracy        minus the batch's accuracy by candidate scoring (classification tasks)
f1, exact_match minus the mean F1 / exact match of greedy generations against the gold answers
reward          minus the weighted sum of reward functions of each prompt and its greedy completion

A ZO step needs only the objective's values at two points, so none of these needs a gradient.
Each returns (sum, count) over this rank's share of the batch, which the optimizer's all-reduce
turns into the global batch mean, as it does for the loss. Generation is greedy and deterministic,
so the + and - points of a step differ only by the perturbation.

Reward functions have the signature of TRL's GRPO reward functions,
``f(prompts, completions, completion_ids, **columns) -> list[float]`` (the dataset's other
columns as keyword arguments, one list each), so the ones written for TRL work unchanged; a
``None`` reward (the function does not apply to an example) counts 0.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zoscale.config import ObjectiveConfig
from zoscale.engine.comm import Comm
from zoscale.errors import ConfigError
from zoscale.train.data import Encoded
from zoscale.train.evaluate import exact_match, f1_score, generate, rank_batches
from zoscale.train.losses import Batch
from zoscale.train.tasks import Task

# names a reward function is called with besides the dataset's columns (TRL passes the same)
RESERVED = ("prompts", "completions", "completion_ids", "prompt", "completion")


@functools.cache  # a file is executed once, though the config check and the trainer both ask for it
def load_function(spec: str) -> Callable:
    """MODULE:FUNCTION, or path/to/file.py:FUNCTION; a one-line ConfigError names what is wrong."""
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise ConfigError(f"objective.rewards: {spec}: no such file {where}")
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())  # a module beside the command, as `python -m` would find it
            try:
                module = importlib.import_module(where)
            finally:
                sys.path.remove(os.getcwd())
    except ConfigError:
        raise
    except Exception as e:  # whatever the user's module raises while it is imported
        raise ConfigError(f"objective.rewards: {spec}: importing {where} failed ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"objective.rewards: {spec}: {where} has no function {name}")
    return function


@dataclass(frozen=True)
class Reward:
    name: str
    function: Callable
    weight: float

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 columns: dict[str, list]) -> list[float]:
        try:
            values = self.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:
            raise ConfigError(f"objective.rewards: {self.name} raised {type(e).__name__}: {e}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise ConfigError(f"objective.rewards: {self.name} returned {got} for {len(prompts)} completions; it must "
                              f"return a list of floats, one per completion")
        out = []
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"objective.rewards: {self.name} returned {v!r}; rewards are floats (or None)")
            out.append(0.0 if v is None else self.weight * float(v))
        return out


def check_task(cfg: ObjectiveConfig, task: Task) -> None:
    """What the objective needs of the task, before anything is built."""
    if cfg.name == "accuracy" and task.evaluation != "candidates":
        raise ConfigError(f"objective.name: accuracy scores candidates; task {task.name} is scored by generation "
                          f"(use f1 or exact_match)")
    if cfg.name in ("f1", "exact_match") and task.evaluation != "generate":
        raise ConfigError(f"objective.name: {cfg.name} compares generations with gold answers; task {task.name} "
                          f"has candidates (use accuracy)")


def rewards_of(functions: list, weights: list[float] | None) -> list[Reward]:
    """Reward functions, each a callable or a MODULE:FUNCTION string, with their weights."""
    weights = [1.0] * len(functions) if weights is None else list(weights)
    if len(weights) != len(functions):
        raise ConfigError(f"objective.weights: {len(weights)} weights for {len(functions)} reward functions")
    out = []
    for f, w in zip(functions, weights):
        function = load_function(f) if isinstance(f, str) else f
        if not callable(function):
            raise ConfigError(f"objective.rewards: {f!r} is not a function")
        out.append(Reward(f.rpartition(":")[2] if isinstance(f, str) else getattr(f, "__name__", repr(f)),
                          function, float(w)))
    return out


class Measure:
    """The objective as a function of this rank's share: ``value(model, batch) -> (sum, count)``,
    minimized; ``generated_value(model, examples)`` for the objectives that generate, on encoded
    examples alone (ZOTrainer's rows)."""

    def __init__(self, name: str, tokenizer, device, synced: bool, rewards: list[Reward] = (),
                 max_new_tokens: int = 16, stop=("\n",)):
        self.name, self.tokenizer, self.device, self.synced = name, tokenizer, device, synced
        self.rewards, self.max_new_tokens, self.stop = list(rewards), max_new_tokens, tuple(stop)
        self._warned = False

    @classmethod
    def of(cls, cfg: ObjectiveConfig, tokenizer, device, synced: bool) -> Measure:
        return cls(cfg.name, tokenizer, device, synced, rewards_of(cfg.rewards, cfg.weights), cfg.max_new_tokens,
                   cfg.stop)

    @property
    def discrete(self) -> bool:
        return self.name != "loss"

    def value(self, model, batch: Batch) -> tuple[float, int]:
        name = self.name
        if name == "loss":
            return batch.loss(model)
        if name == "accuracy":
            predicted = batch.predictions(model).tolist()
            return -float(sum(p == e.label for p, e in zip(predicted, batch.encoded))), len(predicted)
        return self.generated_value(model, batch.encoded)

    def generated_value(self, model, examples: list[Encoded]) -> tuple[float, int]:
        texts, ids = self.generate(model, examples)
        if self.name == "reward":
            return -sum(self.score(examples, texts, ids)), len(texts)
        metric = f1_score if self.name == "f1" else exact_match
        return -sum(max(metric(t, a) for a in e.answers) for t, e in zip(texts, examples)), len(texts)

    def generate(self, model, examples: list[Encoded]) -> tuple[list[str], list[list[int]]]:
        return generate(model, self.tokenizer, examples, self.max_new_tokens, self.device, self.stop, self.synced)

    def score(self, examples: list[Encoded], texts: list[str], ids: list[list[int]]) -> list[float]:
        """Each completion's weighted reward (nan where a function said nan: the step is skipped
        as a non-finite loss would be)."""
        prompts = [e.text for e in examples]
        names = [k for k in examples[0].columns if k not in RESERVED]
        columns = {k: [e.columns.get(k) for e in examples] for k in names}
        total = [0.0] * len(examples)
        for reward in self.rewards:
            for i, v in enumerate(reward(prompts, texts, ids, columns)):
                total[i] += v
                if not math.isfinite(v) and not self._warned:
                    print(f"objective: reward {reward.name} returned {v} (the step counts as a non-finite loss)",
                          file=sys.stderr, flush=True)
                    self._warned = True
        return total

    def mean_reward(self, model, mine: list[Encoded], batch_size: int, comm: Comm,
                    sharded: tuple[int, Encoded] | None) -> float:
        """The global mean reward of the greedy completions of every rank's examples (evaluation)."""
        total = count = 0.0
        for chunk, counts in rank_batches(mine, batch_size, sharded):
            texts, ids = self.generate(model, chunk)
            if counts:
                total, count = total + sum(self.score(chunk, texts, ids)), count + len(chunk)
        total, count = comm.all_reduce_sum([total, count])
        return total / max(count, 1.0)
