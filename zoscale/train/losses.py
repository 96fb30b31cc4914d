"""Losses on a causal LM, split into body and head (forwards under no_grad, not inference_mode:
FSDP2's gathered parameters must stay ordinary tensors for PseuZO's head autograd).

body(model) -> the last hidden state; head: the output embedding applied only at the positions
that are scored (so no (batch, length, vocab) tensor is formed for the whole sequence).
``Batch.outputs`` offers the split to an optimizer that asks for it (PseuZO): the body output and
a head loss on it.

Objectives, all returned as (loss_sum, count) so that the global mean is exact across ranks:
- classification: each candidate's mean token log-likelihood after the prompt is its score;
  cross-entropy over the candidates, summed over examples (count = examples). When every
  candidate of a batch is one token (SST-2's " terrible" / " great"), the prompt is forwarded once
  and each candidate read at its last position: what each prompt + candidate forward gives there
  (causal attention), for 1/(number of candidates) of the cost;
- lm: negative log-likelihood of the gold answer's tokens (count = tokens);
- masked (masked LMs): each candidate's logit at the prompt's mask token, cross-entropy over
  candidates (LM-BFF); the full forward gives the logits, as the MLM head is more than the
  output embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoscale.models import BodyHead, causal_lm
from zoscale.train.data import Encoded


def single_tokens(example: Encoded) -> bool:
    return bool(example.candidates) and all(len(c) == 1 for c in example.candidates)


def sequence_length(example: Encoded, objective: str) -> int:
    """The longest sequence ``example`` contributes to a Batch."""
    if objective == "masked" or (objective == "classification" and single_tokens(example)):
        return len(example.prompt)
    tails = [len(c) for c in example.candidates] if objective == "classification" else [len(example.target)]
    return len(example.prompt) + max(tails)


class Batch:
    """Encoded examples packed as right-padded sequences for one objective."""

    def __init__(self, examples: list[Encoded], objective: str, pad_id: int, device, split: BodyHead = BodyHead(),
                 pad_to: int = 0, mask_id: int | None = None):
        """``split``: the model's body and head (a sharded backend's own). ``pad_to``: pad to at least
        this length (a rank's share of a global batch pads like the whole batch)."""
        self.objective, self.split, self.encoded = objective, split, examples
        sequences, spans, self.groups, labels = [], [], [], []
        self.candidate_ids = [ex.candidates for ex in examples]
        # shared: one sequence (the prompt) per example, scored at its last position, where each
        # candidate's token is read (candidate_rows, candidate_tokens); groups index candidates
        self.shared = objective == "classification" and all(single_tokens(ex) for ex in examples)
        rows, tokens = [], []
        for ex in examples:
            if self.shared:
                self.groups.append(list(range(len(tokens), len(tokens) + len(ex.candidates))))
                rows += [len(sequences)] * len(ex.candidates)
                tokens += [c[0] for c in ex.candidates]
                spans.append((len(ex.prompt), 1))
                sequences.append(ex.prompt)
                labels.append(ex.label)
            elif objective == "masked":
                spans.append((ex.prompt.index(mask_id) + 1, 1))  # marks the mask position itself
                sequences.append(ex.prompt)
                labels.append(ex.label)
            elif objective == "classification":
                first = len(sequences)
                for cand in ex.candidates:
                    spans.append((len(ex.prompt), len(cand)))
                    sequences.append(ex.prompt + cand)
                self.groups.append(list(range(first, len(sequences))))
                labels.append(ex.label)
            else:
                spans.append((len(ex.prompt), len(ex.target)))
                sequences.append(ex.prompt + ex.target)
        length = max(pad_to, max(len(s) for s in sequences))
        self.input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        self.attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        # target[i, p] = the token at p+1 when it belongs to a scored span (predicted at position p)
        self.scored = torch.zeros((len(sequences), length), dtype=torch.bool)
        for i, (seq, (start, size)) in enumerate(zip(sequences, spans)):
            self.input_ids[i, : len(seq)] = torch.tensor(seq)
            self.attention_mask[i, : len(seq)] = 1
            self.scored[i, start - 1 : start - 1 + size] = True
        self.targets = torch.roll(self.input_ids, -1, dims=1)
        self.candidate_rows, self.candidate_tokens = torch.tensor(rows, dtype=torch.long), torch.tensor(tokens)
        self.labels = torch.tensor(labels, dtype=torch.long) if labels else None
        self.examples = len(examples)
        self.to(device)

    def to(self, device) -> Batch:
        for name in ("input_ids", "attention_mask", "scored", "targets", "labels", "candidate_rows",
                     "candidate_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    # -- body and head --------------------------------------------------------------------------
    def body(self, model) -> torch.Tensor:
        return self.split.body(model, self.input_ids, self.attention_mask)

    def token_logprobs(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each scored token, flattened in (sequence, position) order (shared:
        of each candidate's token, in candidate order)."""
        return self.logprobs_from_logits(self.head(model, hidden[self.scored]))

    def head(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return self.split.head(model, hidden)

    def logprobs_from_logits(self, scored_logits: torch.Tensor) -> torch.Tensor:
        if self.shared:
            return F.log_softmax(scored_logits.float(), -1)[self.candidate_rows, self.candidate_tokens]
        return -F.cross_entropy(scored_logits.float(), self.targets[self.scored], reduction="none")

    def candidate_scores(self, token: torch.Tensor) -> torch.Tensor:
        """Each candidate's mean scored-token log-likelihood (a sequence each, unless shared)."""
        if self.shared:
            return token
        owner = self.scored.nonzero()[:, 0]
        totals = torch.zeros(self.scored.shape[0], dtype=token.dtype, device=token.device).index_add(0, owner, token)
        return totals / self.scored.sum(1).clamp_min(1)

    def loss_from_token_logprobs(self, token: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.objective == "lm":
            return -token.sum(), int(token.numel())
        scores = self.candidate_scores(token)
        per_example = torch.stack([-F.log_softmax(scores[g], 0)[y] for g, y in zip(self.groups, self.labels)])
        return per_example.sum(), self.examples

    def mask_scores(self, model) -> list[torch.Tensor]:
        """Masked LMs: each example's candidate logits at its mask token (full forward)."""
        logits = causal_lm(model)(input_ids=self.input_ids, attention_mask=self.attention_mask).logits
        at_mask = logits[self.scored].float()  # one row per example, in order
        return [row[[c[0] for c in cands]] for row, cands in zip(at_mask, self.candidate_ids)]

    def head_loss(self, model, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(loss_sum, count) from the body output: differentiable with respect to ``hidden``."""
        return self.loss_from_token_logprobs(self.token_logprobs(model, hidden))

    def outputs(self, model, kind: str = "hidden"):
        """(output, head_loss): the last hidden state or the logits, both (sequence, position, ...)
        so that outputs of batches that score different numbers of tokens still pair position by
        position (no grad), and the loss as a differentiable function of it. The logits cover every
        position: (sequences x length x vocabulary) values, as in the authors' code."""
        with torch.no_grad():
            hidden = self.body(model)
            if kind == "hidden":
                return hidden, lambda h: self.head_loss(model, h)
            logits = self.head(model, hidden)
        return logits, lambda o: self.loss_from_token_logprobs(self.logprobs_from_logits(o[self.scored]))

    def loss_tensor(self, model) -> tuple[torch.Tensor, int]:
        """(loss_sum, count), differentiable when grad is enabled."""
        if self.objective == "masked":
            scores = self.mask_scores(model)
            return sum(-F.log_softmax(s, 0)[y] for s, y in zip(scores, self.labels)), self.examples
        return self.head_loss(model, self.body(model))

    def pair_loss(self, model, dual, terms) -> list[tuple[float, int]]:
        """(loss_sum, count) at theta + terms and at theta - terms from one forward of the batch
        taken twice (engine/dual.py): a sharded layer is gathered once for both."""
        ids, mask = self.input_ids.repeat(2, 1), self.attention_mask.repeat(2, 1)
        with torch.no_grad(), dual.pair(terms, rows=ids.shape[0]):
            plus, minus = self.split.body(model, ids, mask).chunk(2)
            logits = self.head(model, torch.cat([plus[self.scored], minus[self.scored]]))
        losses = []
        for half in logits.chunk(2):
            total, count = self.loss_from_token_logprobs(self.logprobs_from_logits(half))
            losses.append((float(total), count))
        return losses

    def loss(self, model) -> tuple[float, int]:
        with torch.no_grad():
            total, count = self.loss_tensor(model)
        return float(total), count

    def backward(self, model) -> tuple[float, int]:
        """The loss, its sum's gradient accumulated into the trainable parameters (first-order baselines)."""
        with torch.enable_grad():
            total, count = self.loss_tensor(model)
            total.backward()
        return float(total.detach()), count

    def predictions(self, model) -> torch.Tensor:
        """The highest-scoring candidate of each example (classification batches)."""
        with torch.no_grad():
            if self.objective == "masked":
                return torch.stack([s.argmax() for s in self.mask_scores(model)]).cpu()
            scores = self.candidate_scores(self.token_logprobs(model, self.body(model)))
        return torch.stack([scores[g].argmax() for g in self.groups]).cpu()

