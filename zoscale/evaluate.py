"""Evaluation: accuracy by candidate scoring, or F1 / exact match of greedy generations."""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

from zoscale.comm import Comm
from zoscale.data import Encoded
from zoscale.losses import Batch, causal_lm


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
def generate(model, tokenizer, examples: list[Encoded], max_new_tokens: int, device) -> list[str]:
    """Greedy continuations of the prompts (left-padded batch), cut at the first newline."""
    width = max(len(e.prompt) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, width - len(e.prompt):] = torch.tensor(e.prompt)
        mask[i, width - len(e.prompt):] = 1
    out = causal_lm(model).generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.split("\n")[0] for t in texts]


def evaluate(model, tokenizer, examples: list[Encoded], evaluation: str, batch_size: int, pad_id: int, device,
             comm: Comm, max_new_tokens: int = 50, body=None, head=None, mask_id: int | None = None
             ) -> dict[str, float]:
    """This rank's examples; the sums go through one all-reduce, so every rank gets global metrics."""
    totals = [0.0, 0.0, 0.0]  # accuracy: correct, -, count | generation: f1, em, count
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if evaluation == "candidates":
            objective = "classification" if mask_id is None else "masked"
            batch = Batch(chunk, objective, pad_id, device, body=body, head=head, mask_id=mask_id)
            predicted = batch.predictions(model)
            totals[0] += sum(int(p == e.label) for p, e in zip(predicted.tolist(), chunk))
        else:
            for text, e in zip(generate(model, tokenizer, chunk, max_new_tokens, device), chunk):
                totals[0] += max(f1_score(text, a) for a in e.answers)
                totals[1] += max(exact_match(text, a) for a in e.answers)
        totals[2] += len(chunk)
    correct_or_f1, em, count = comm.all_reduce_sum(totals)
    count = max(count, 1.0)
    if evaluation == "candidates":
        return {"accuracy": correct_or_f1 / count, "examples": count}
    return {"f1": correct_or_f1 / count, "exact_match": em / count, "examples": count}


def headline(metrics: dict[str, float]) -> float:
    """The number a run is judged by: accuracy, or F1 for generation tasks."""
    return metrics["accuracy"] if "accuracy" in metrics else metrics["f1"]
