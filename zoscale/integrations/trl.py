"""ZOSFTTrainer: TRL's SFTTrainer with ZOTrainer's zeroth-order step.

    from trl import SFTConfig
    trainer = ZOSFTTrainer(model=model, args=SFTConfig(output_dir="out", ...), train_dataset=chats,
                           processing_class=tokenizer, zo_optimizer="mezo", zo_options={"eps": 1e-3})

Everything SFTTrainer does to the data is its own (messages through the chat template, prompt /
completion, packing, completion-only loss) and its loss is the one the step minimizes. What the
composition adds:

- SFTConfig turns ``gradient_checkpointing`` on by default; a ZO step runs no backward, so it is
  turned off, with a notice (ZOTrainer refuses it when asked for explicitly in TrainingArguments).
- SFTTrainer files its metrics (entropy, mean token accuracy, tokens seen) under the model's mode,
  and ZO forwards run in eval mode (no dropout): the step's metrics are moved to the training
  metrics, the mean over the step's perturbed forwards, and its tokens counted once.
"""

from __future__ import annotations

import copy

from transformers.utils import logging

from zoscale.integrations.transformers import ZOTrainer

try:
    from trl import SFTTrainer
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("ZOSFTTrainer needs TRL (pip install trl)") from e

logger = logging.get_logger(__name__)


class ZOSFTTrainer(ZOTrainer, SFTTrainer):
    def __init__(self, model=None, args=None, *rest, **kwargs):
        if args is not None and args.gradient_checkpointing:
            logger.warning("ZOSFTTrainer: gradient_checkpointing turned off (a ZO step runs no backward, so it has "
                           "no activations to recompute)")
            args = copy.copy(args)  # the caller's config stays as given
            args.gradient_checkpointing = False
        super().__init__(model, args, *rest, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        batches = list(self._micro_batches)  # the update's micro-batches, when its ZO step runs now
        before = {key: list(values) for key, values in self._metrics["eval"].items()}
        loss = super().training_step(model, inputs, num_items_in_batch)
        if batches:
            self._step_metrics_to_training(before, batches)
        return loss

    def _step_metrics_to_training(self, before: dict[str, list], batches: list[dict]) -> None:
        """What SFTTrainer filed under eval during the step's forwards becomes one training entry
        per metric (their mean); eval keeps what it held; the step's tokens count once."""
        for key, values in list(self._metrics["eval"].items()):
            new = values[len(before.get(key, [])):]
            if new and key != "num_tokens":
                self._metrics["train"][key].append(sum(new) / len(new))
            if key in before:
                self._metrics["eval"][key] = before[key]
            else:
                del self._metrics["eval"][key]
        if all("attention_mask" in b for b in batches):
            self._total_train_tokens += sum(self.accelerator.gather_for_metrics(b["attention_mask"].sum()).sum().item()
                                            for b in batches)
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """A training log (it carries ``loss``) while the model is in eval mode: SFTTrainer reads the
        mode to choose between its training and evaluation metrics."""
        if "loss" not in logs or self.model.training:
            return super().log(logs, start_time)
        self.model.training = True  # the flag alone, read by SFTTrainer.log; no forward runs here
        try:
            super().log(logs, start_time)
        finally:
            self.model.training = False
