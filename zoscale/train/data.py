"""Task data: load (hub or local files), sample as MeZO does, tokenize, and order batches.

Sampling: train and dev are disjoint samples of the task's train split, test is a sample of its
test split (``num_*`` examples each, by ``data.seed``). Batch order is a pure function of
(run seed, step): each epoch is a fresh permutation of the train set, so a resumed run needs only
the step to continue with the same batches, and ranks can split each global batch the same way.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from zoscale.config import DataConfig
from zoscale.engine import rng
from zoscale.errors import ConfigError
from zoscale.train.tasks import Example, Task

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Encoded:
    """One example as token ids: the prompt, each candidate's ids, the training target's ids."""

    prompt: list[int]
    candidates: list[list[int]]
    label: int | None
    target: list[int]  # lm objective: the gold answer's tokens
    answers: list[str]
    text: str = ""  # the prompt as text
    columns: dict = field(default_factory=dict)  # the raw example's fields


def _local_split(path: Path, split: str):
    """One split's rows; each problem names the file (and the line, for JSON lines)."""
    import datasets

    files = [path / f"{split}{suffix}" for suffix in LOCAL_FORMATS]
    found = [f for f in files if f.is_file()]
    if not found:
        raise ConfigError(f"data.path: {path} has no {split}.jsonl/.json/.csv/.parquet")
    file = found[0]
    if file.stat().st_size == 0:
        raise ConfigError(f"data.path: {file} is empty")
    if file.suffix == ".jsonl":
        return datasets.Dataset.from_list(_json_lines(file))
    try:
        return datasets.load_dataset(LOCAL_FORMATS[file.suffix], data_files={split: str(file)}, split=split)
    except Exception as e:  # pyarrow, pandas and datasets each raise their own kinds
        raise ConfigError(f"data.path: cannot read {file} ({str(e).strip().splitlines()[0]})") from None


def _json_lines(file: Path) -> list[dict]:
    rows = []
    with open(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"data.path: {file} line {number} is not UTF-8 ({e.reason} at byte {e.start})") \
                    from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.path: {file} line {number} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"data.path: {file} line {number} is not a JSON object")
            rows.append(row)
    if not rows:
        raise ConfigError(f"data.path: {file} holds no rows")
    return rows


def load_raw(cfg: DataConfig, task: Task):
    """(train pool, test pool) as datasets.Dataset objects."""
    if cfg.path is not None:
        path = Path(cfg.path)
        if not path.is_dir():
            raise ConfigError(f"data.path: no such directory {path}")
        pools = _local_split(path, task.train_split), _local_split(path, task.test_split)
        for pool, split in zip(pools, (task.train_split, task.test_split)):
            missing = sorted(set(task.fields) - set(pool.column_names))
            if missing:
                raise ConfigError(f"data.path: {split} examples lack field(s) {missing} that task {task.name} needs "
                                  f"(it reads {list(task.fields)}; see docs/tasks.md)")
        return pools
    if not task.hub:
        raise ConfigError(f"data.path: task {task.name} has no hub dataset; give a directory of local files")
    import datasets

    loaded = datasets.load_dataset(*task.hub)
    return loaded[task.train_split], loaded[task.test_split]


def sample(cfg: DataConfig, task: Task) -> dict[str, list[Example]]:
    train_pool, test_pool = load_raw(cfg, task)
    order = list(range(len(train_pool)))
    random.Random(cfg.seed).shuffle(order)
    test_order = list(range(len(test_pool)))
    random.Random(cfg.seed + 1).shuffle(test_order)

    if cfg.balance and task.evaluation != "candidates":
        raise ConfigError(f"data.balance: task {task.name} is scored by generation: it has no labels to balance")

    def build(pool, indices, count, split, key):
        """The first ``count`` examples in ``indices`` order (with data.balance, count // classes of each
        label), and how many indices they read: the rest are the next split's."""
        out, per_label, used = [], Counter(), len(indices)
        for position, i in enumerate(indices):
            if len(out) == count:
                used = position
                break
            try:
                row = pool[i]
                example = task.build(row)
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise ConfigError(f"data: {split} row {i + 1} does not fit task {task.name} ({type(e).__name__}: "
                                  f"{e})") from None
            if example is None:
                continue
            label_ok = example.label is None or not example.candidates or \
                (isinstance(example.label, int) and 0 <= example.label < len(example.candidates))
            if not label_ok:
                raise ConfigError(f"data: {split} row {i + 1} has label {example.label!r}, but task {task.name} "
                                  f"has {len(example.candidates)} classes (0 to {len(example.candidates) - 1})")
            if cfg.balance:
                if per_label and len(example.candidates) != classes:
                    raise ConfigError(f"data.balance: task {task.name} offers different numbers of candidates, "
                                      f"so its labels cannot be balanced")
                classes = len(example.candidates)
                count -= count % classes  # equal shares: an odd count rounds down
                if per_label[example.label] == count // classes:
                    continue
                per_label[example.label] += 1
            out.append(replace(example, columns=dict(row)))
        if cfg.balance and out and len(out) < count:
            short = min(range(classes), key=lambda label: per_label[label])
            raise ConfigError(f"data.balance: {split} holds {per_label[short]} examples of label {short}, "
                              f"fewer than the {count // classes} a balanced sample of {count} needs; lower data.{key}")
        return out, used

    train_name, test_name = _split_names(cfg, task)
    train, used = build(train_pool, order, cfg.num_train, train_name, "num_train")
    dev, _ = build(train_pool, order[used:], cfg.num_dev, train_name, "num_dev")
    test, _ = build(test_pool, test_order, cfg.num_test, test_name, "num_test")
    return {"train": train, "dev": dev, "test": test}


def _split_names(cfg: DataConfig, task: Task) -> tuple[str, str]:
    """How errors name the two pools: the local files, or the hub splits."""
    if cfg.path is None:
        return task.train_split, task.test_split
    names = []
    for split in (task.train_split, task.test_split):
        found = [Path(cfg.path) / f"{split}{suffix}" for suffix in LOCAL_FORMATS]
        names.append(str(next((f for f in found if f.is_file()), split)))
    return names[0], names[1]


def encode(example: Example, tokenizer, max_length: int, masked: bool = False) -> Encoded:
    piece = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if masked:  # the answer fills a mask at the end of the prompt: one token per candidate
        if tokenizer.mask_token is None:
            raise ConfigError("model.kind: masked, but the tokenizer has no mask token")
        candidates = [piece(c) for c in example.candidates]
        for text, ids in zip(example.candidates, candidates):
            if len(ids) != 1:
                raise ConfigError(f"model.kind: masked LMs score one token at the mask; candidate {text!r} is "
                                  f"{len(ids)} tokens for this tokenizer")
        prompt = tokenizer(example.prompt + tokenizer.mask_token)["input_ids"]
        return Encoded(prompt[-max_length:], candidates, example.label, [], list(example.answers), example.prompt,
                       example.columns)
    prompt = tokenizer(example.prompt)["input_ids"]
    candidates = [piece(c) for c in example.candidates]
    target = piece(example.answers[0]) if example.answers else (candidates[example.label] if candidates else [])
    longest = max([len(c) for c in candidates] + [len(target)])
    keep = max(1, max_length - longest)
    return Encoded(prompt[-keep:], candidates, example.label, target, list(example.answers), example.prompt,
                   example.columns)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of step ``step``: positions [step*B, (step+1)*B) of the endless sequence of
    per-epoch permutations keyed by (seed, epoch)."""
    out = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, num_examples)
        generator = torch.Generator().manual_seed(rng.mix_seed(seed, epoch) & (2**63 - 1))
        permutation = torch.randperm(num_examples, generator=generator).tolist()
        take = permutation[offset : offset + batch_size - len(out)]
        out.extend(take)
        position += len(take)
    return out


def rank_share(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global batch (the first batch % world ranks get one more)."""
    base, extra = divmod(len(indices), world)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (rank < extra)]
