"""Evaluation: accuracy by candidate scoring, or F1 / exact match of greedy generations."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import torch

from zoscale.engine.comm import Comm
from zoscale.models import BodyHead, causal_lm
from zoscale.train.data import Encoded
from zoscale.train.losses import Batch

MAX_CLASSES = 16  # label words counted per label (balanced accuracy)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


@torch.no_grad()
def generate(model, tokenizer, examples: list[Encoded], max_new_tokens: int, device, stop=("\n",),
             synced: bool = False) -> tuple[list[str], list[list[int]]]:
    """Greedy continuations of the prompts (a left-padded batch, the KV cache on): their texts cut
    before the first stop string, and their token ids. ``synced``: the model's forward is a
    collective (sharded), so every rank keeps stepping until the last rank's sequences are done."""
    width = max(len(e.prompt) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, width - len(e.prompt):] = torch.tensor(e.prompt)
        mask[i, width - len(e.prompt):] = 1
    out = causal_lm(model).generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    synced_gpus=synced)
    new = out[:, width:].tolist()
    special = set(tokenizer.all_special_ids)
    token_ids = [[t for t in row if t not in special] for row in new]
    texts = [cut(t, stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts, token_ids


def cut(text: str, stop) -> str:
    """``text`` up to the first of the stop strings."""
    end = min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))
    return text[:end]


def rank_batches(mine: list, batch_size: int, sharded: tuple[int, Encoded] | None) -> list[tuple[list, bool]]:
    """This rank's examples in batches of ``batch_size``, each with whether it counts. ``sharded``:
    (the largest rank's share, a filler example) when the model's forward is a collective; then
    every rank runs as many batches as that share needs, the extra ones over [filler], not counted."""
    out = [(mine[i : i + batch_size], True) for i in range(0, len(mine), batch_size)]
    if sharded is None:
        return out
    most, filler = sharded
    return out + [([filler], False)] * (math.ceil(most / batch_size) - len(out))


def evaluate(model, tokenizer, examples: list[Encoded], evaluation: str, batch_size: int, pad_id: int, device,
             comm: Comm, max_new_tokens: int = 50, split: BodyHead = BodyHead(), mask_id: int | None = None,
             sharded: tuple[int, Encoded] | None = None) -> dict[str, float]:
    """This rank's examples; the sums go through one all-reduce, so every rank gets global metrics.
    ``sharded``: as for ``rank_batches``.
    Where every example offers the same candidates (a classifier's label words, up to MAX_CLASSES),
    accuracy comes with the balanced accuracy (mean recall over the labels present) and the majority
    label's share: on skewed labels, what always answering that label would score."""
    totals = [0.0, 0.0, 0.0, 0.0]  # accuracy: correct, -, count, varied | generation: f1, em, count, -
    per_label = [0.0] * (2 * MAX_CLASSES)  # correct, then count, by gold label
    choices = {tuple(map(tuple, e.candidates)) for e in examples}
    totals[3] = float(len(choices) > 1 or any(e.label is None or e.label >= MAX_CLASSES for e in examples))
    for chunk, counts in rank_batches(examples, batch_size, sharded):
        if evaluation == "candidates":
            objective = "classification" if mask_id is None else "masked"
            batch = Batch(chunk, objective, pad_id, device, split=split, mask_id=mask_id)
            predicted = batch.predictions(model)
            for p, e in zip(predicted.tolist() if counts else [], chunk):
                totals[0] += int(p == e.label)
                if not totals[3]:
                    per_label[e.label] += int(p == e.label)
                    per_label[MAX_CLASSES + e.label] += 1
        else:
            texts, _ = generate(model, tokenizer, chunk, max_new_tokens, device, synced=sharded is not None)
            for text, e in zip(texts if counts else [], chunk):
                totals[0] += max(f1_score(text, a) for a in e.answers)
                totals[1] += max(exact_match(text, a) for a in e.answers)
        totals[2] += len(chunk) if counts else 0
    summed = comm.all_reduce_sum(totals + per_label)
    correct_or_f1, em, count, varied = summed[:4]
    count = max(count, 1.0)
    if evaluation == "generate":
        return {"f1": correct_or_f1 / count, "exact_match": em / count, "examples": count}
    metrics = {"accuracy": correct_or_f1 / count, "examples": count}
    correct, seen = summed[4 : 4 + MAX_CLASSES], summed[4 + MAX_CLASSES :]
    if not varied and any(seen):
        recalls = [c / n for c, n in zip(correct, seen) if n]
        metrics |= {"balanced_accuracy": sum(recalls) / len(recalls), "majority": max(seen) / count}
    return metrics


def headline(metrics: dict[str, float]) -> float:
    """The number a run is judged by: the reward of a reward objective, else accuracy, or F1 for
    generation tasks."""
    return metrics[headline_key(metrics)]


def headline_key(metrics: dict[str, float]) -> str:
    for key in ("reward", "accuracy", "f1"):
        if key in metrics:
            return key
    raise KeyError(f"no headline metric in {sorted(metrics)}")
