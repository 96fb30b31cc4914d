"""ZOTrainer: a `transformers.Trainer` whose optimizer step is a zeroth-order step.

    trainer = ZOTrainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...,
                        data_collator=..., zo_optimizer="mezo", zo_options={"eps": 1e-3})
    trainer.train(resume_from_checkpoint=...)

Everything but the step is the Trainer's: data loading and its order, evaluation and
`compute_metrics`, logging (`loss`, `projected_grad`, `learning_rate`; `report_to` sees them),
callbacks, `save_steps`/`save_total_limit`, `save_model`. What is replaced, and why:

- ``get_batch_samples``: the Trainer prefetches an update's micro-batches; they are kept, so that
  gradient accumulation becomes one larger ZO batch (the micro-batches' losses summed into one
  projected gradient), not several ZO steps.
- ``training_step``: at the first micro-batch of an update, the whole ZO step (its forwards under
  no_grad, in eval mode: the two forwards of a step must see one function); the rest return 0,
  so the Trainer's logged loss is the step's global loss.
- ``create_optimizer``: the ZO optimizer over the model's trainable parameters (or the shards of
  ``zo_backend``), behind a torch optimizer of one empty parameter group that carries the lr:
  the Trainer's scheduler (``learning_rate``, ``lr_scheduler_type``, warm-up) sets it, and the ZO
  step reads it, unless zo_options give ``lr`` or ``schedule`` (then zoscale's schedule runs).
  Its ``step()`` does nothing: the ZO step ran already.
- ``_wrap_model``: no DistributedDataParallel (ZO has no gradients to reduce, and DDP's gradient
  buckets would cost a model's worth of memory); data-parallel ranks agree through the all-reduced
  losses, as in ``zoscale train``.
- ``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler``: the ZO state (step,
  buffers such as ConMeZO's momentum or SVRG's anchor, and the trainable parameters themselves)
  goes into ``checkpoint-N/zoscale/`` as a zoscale checkpoint (atomic, checksummed, per rank), so
  ``resume_from_checkpoint`` continues the same trajectory on any world size.
- ``save_model`` on a sharded model: the shards gathered into one state dict for rank 0;
  ``_load_best_model`` on one: each rank reads its elements of the best checkpoint's ZO state.
- ``log``: ``projected_grad`` and the ZO step's lr in the training logs, no ``grad_norm``;
  ``evaluation_loop`` and ``save_model`` flush a deferred update first.

- ``prediction_step`` with an objective other than the loss: the evaluation's ``eval_loss`` is the
  objective's mean (minus the accuracy, F1 or reward), as the ZO step minimizes it.

Objectives (``zo_objective``, docs/training.md "Objectives"): "loss" (``compute_loss``),
"accuracy" (minus the fraction of label tokens, or rows for a classifier, that the logits' argmax
gets right), "f1" and "exact_match" (greedy generations from the dataset's ``prompt`` column
against its ``answers``), or reward functions (a callable, a "MODULE:FUNCTION" string, or a list
of them with ``zo_reward_weights``: TRL's GRPO signature ``f(prompts, completions, **columns)``).
The generating objectives read rows, not tensors: keep the dataset's columns
(``remove_unused_columns=False``) and pass ``processing_class`` (the tokenizer); without a
``data_collator`` the rows are batched as they are.

- ``_prepare_for_training`` (under the Trainer's own ``deepspeed=`` or ``fsdp=``): the model alone
  goes through ``accelerator.prepare``, so ZeRO-3 partitions it (or FSDP2 shards it) without an
  optimizer, whose fp32 states a ZO step has no use for (they would triple the memory); the ZO
  optimizer is then built over the partitions. Resuming reads the zoscale checkpoint, not
  DeepSpeed's or FSDP's optimizer files, which are not written.

Sharding, two ways. The Trainer's own: ``TrainingArguments(deepspeed="configs/deepspeed/zero3.json")``
(stage 3; parameters under its persistence threshold are kept whole on every rank; runs on CPU
ranks too) or ``fsdp=...`` with
``fsdp_config={"version": 2, "reshard_after_forward": True}`` (needs CUDA: on CPU the Trainer falls
back to DDP without sharding, so it is refused there). Or zoscale's: ``zo_backend="fsdp"`` (FSDP2)
or ``"deepspeed"`` (ZeRO-3) shards the model with zoscale's backends before the Trainer sees it,
under torchrun or alone; the Trainer then runs only the loop.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

import zoscale
from zoscale import backends
from zoscale.config import GENERATING, OBJECTIVES, check_deepspeed_json
from zoscale.engine import local_shards
from zoscale.engine.comm import Comm
from zoscale.engine.dual import DualForward
from zoscale.errors import ConfigError
from zoscale.models import BodyHead, causal_lm
from zoscale.optim import REGISTRY
from zoscale.optim.base import Objective
from zoscale.train import checkpoint
from zoscale.train.data import Encoded
from zoscale.train.objectives import Measure, rewards_of
from zoscale.train.stall import StallWatch

ZO_BACKENDS = ("fsdp", "deepspeed")
logger = logging.getLogger(__name__)
_ZO_STATE = "zoscale"  # checkpoint-N/zoscale/: the ZO optimizer's checkpoint


class LrCarrier(torch.optim.Optimizer):
    """The torch optimizer the Trainer and its lr scheduler see: one group, one empty tensor."""

    def __init__(self, lr: float):
        super().__init__([torch.zeros(0)], {"lr": lr})

    def step(self, closure=None):
        return None


class _NoDDP(torch.nn.Module):
    """The model as the Trainer's loop holds it: not wrapped in DistributedDataParallel."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class Rows(dict):
    """A batch of dataset rows as they are (the generating objectives), with a tensor whose length
    is the batch's, so that the Trainer's loops can count its examples."""

    @classmethod
    def collate(cls, rows: list[dict]) -> Rows:
        return cls(rows=list(rows), size=torch.zeros(len(rows)))


def resolve_objective(objective, weights) -> tuple[str, list]:
    """(the objective's name, its reward functions) from ``zo_objective``."""
    if isinstance(objective, str) and objective in OBJECTIVES[:-1]:
        return objective, []
    functions = list(objective) if isinstance(objective, (list, tuple)) else [objective]
    if not functions or any(not (callable(f) or (isinstance(f, str) and ":" in f)) for f in functions):
        raise ValueError(f"zo_objective: {objective!r} is neither one of {list(OBJECTIVES[:-1])} nor reward functions "
                         f"(callables or MODULE:FUNCTION strings)")
    try:
        return "reward", rewards_of(functions, weights)
    except ConfigError as e:
        raise ValueError(str(e).replace("objective.", "zo_objective: ", 1)) from None


# TrainingArguments of the first-order step a ZO step replaces: changed from their defaults, refused
FIRST_ORDER_ONLY = {"max_grad_norm": "a ZO step has no gradient to clip (its projected gradient is one scalar)",
                    "adam_beta1": "it configures the first-order optimizer that zo_optimizer replaces",
                    "adam_beta2": "it configures the first-order optimizer that zo_optimizer replaces",
                    "adam_epsilon": "it configures the first-order optimizer that zo_optimizer replaces",
                    "optim_args": "it configures the first-order optimizer that zo_optimizer replaces"}
# the Trainer's lr schedule, which zo_options' lr or schedule replace
SCHEDULE_ARGUMENTS = ("lr_scheduler_type", "warmup_steps", "lr_scheduler_kwargs")


def _changed(args: TrainingArguments, name: str) -> bool:
    default = TrainingArguments.__dataclass_fields__[name].default
    return getattr(args, name) not in (default, {} if default is None else default)


# transformers.Trainer's private hooks that ZOTrainer overrides or reads, as of transformers 5.10
# through 5.25: a release without one of them would silently bypass the ZO step or its checkpoints
TRAINER_HOOKS = ("_prepare_for_training", "get_batch_samples", "_wrap_model", "_prepare_inputs",
                 "compute_loss_context_manager", "_save", "_save_optimizer_and_scheduler",
                 "_load_optimizer_and_scheduler", "_load_from_checkpoint", "_load_best_model")
TRAINER_STATE = ("_loss_shifts_labels", "_created_lr_scheduler")  # set by Trainer.__init__


def check_trainer_hooks(trainer=None) -> None:
    """The Trainer this transformers ships has the hooks ZOTrainer was written against."""
    import transformers

    missing = [f"Trainer.{n}" for n in TRAINER_HOOKS if not hasattr(Trainer, n)]
    missing += [f"Trainer().{n}" for n in TRAINER_STATE if trainer is not None and not hasattr(trainer, n)]
    if missing:
        raise RuntimeError(f"ZOTrainer overrides transformers.Trainer's private hooks as of transformers 5.10; "
                           f"transformers {transformers.__version__} lacks {', '.join(missing)}: install "
                           f"'transformers>=5.10' (the range pyproject.toml declares)")


def check_arguments(args: TrainingArguments, zo_optimizer: str, zo_backend: str | None,
                    zo_options: dict | None = None) -> None:
    """Combinations a ZO step cannot honour, each a one-line error naming the argument."""
    zo_options = zo_options or {}
    for name, why in FIRST_ORDER_ONLY.items():
        if _changed(args, name) and not (name == "max_grad_norm" and not args.max_grad_norm):
            raise ValueError(f"TrainingArguments.{name}={getattr(args, name)!r}: {why}; leave it at its default")
    if "lr" in zo_options or "schedule" in zo_options:
        for name in SCHEDULE_ARGUMENTS:
            if _changed(args, name):
                raise ValueError(f"TrainingArguments.{name}: zo_options' lr/schedule replace the Trainer's schedule; "
                                 f"set it in zo_options (schedule, warmup_steps, total_steps, min_lr_ratio) instead")
    if args.weight_decay and zo_options.get("weight_decay", args.weight_decay) != args.weight_decay:
        raise ValueError(f"TrainingArguments.weight_decay={args.weight_decay} and zo_options weight_decay="
                         f"{zo_options['weight_decay']} disagree; set one")
    optim, default = (str(getattr(o, "value", o)) for o in (args.optim, TrainingArguments.optim))
    if optim != default:
        raise ValueError(f"TrainingArguments.optim={optim}: ZOTrainer's step is zo_optimizer's "
                         f"({zo_optimizer}); a first-order optimizer would need the backward pass it replaces")
    if args.gradient_checkpointing:
        raise ValueError("TrainingArguments.gradient_checkpointing: ZO steps run no backward, so there are no "
                         "activations to recompute; leave it off")
    if args.fp16:
        raise ValueError("TrainingArguments.fp16: AMP's gradient scaling has no gradients to scale under ZO; "
                         "load the model in float16 or use bf16=True")
    if (args.deepspeed or args.fsdp) and zo_backend is not None:
        raise ValueError(f"zo_backend: {zo_backend!r} and TrainingArguments.{'deepspeed' if args.deepspeed else 'fsdp'} "
                         f"both shard the model; choose one")
    if args.deepspeed:
        zero = args.hf_deepspeed_config.config.get("zero_optimization", {})
        if zero.get("stage", 0) < 3:
            raise ValueError(f"TrainingArguments.deepspeed: ZeRO stage {zero.get('stage', 0)} shards optimizer state, "
                             f"which ZO does not have; use stage 3 (sharded parameters) or no DeepSpeed")
    if args.fsdp:
        fsdp = args.fsdp_config or {}
        if str(fsdp.get("version", 1)) != "2" or not fsdp.get("reshard_after_forward", False):
            raise ValueError("TrainingArguments.fsdp_config: ZOTrainer needs FSDP2 with reshard_after_forward "
                             "(version 2, reshard_after_forward True: a root left gathered would not see the "
                             "perturbations)")
        if args.use_cpu or not torch.cuda.is_available():
            raise ValueError("TrainingArguments.fsdp: the Trainer's FSDP needs CUDA (on CPU it falls back to DDP "
                             "without sharding); pass zo_backend='fsdp' (FSDP2 by zoscale) instead")
    if "gradient" in REGISTRY[zo_optimizer].needs:
        raise ValueError(f"zo_optimizer: {zo_optimizer} is a first-order baseline of zoscale train and compare; a "
                         f"Trainer backpropagates with its own optimizer (TrainingArguments.optim)")
    if zo_backend is not None and zo_backend not in ZO_BACKENDS:
        raise ValueError(f"zo_backend: {zo_backend!r} is not one of {list(ZO_BACKENDS)} (or None: whole replicas)")
    if "outputs" in REGISTRY[zo_optimizer].needs:
        if args.gradient_accumulation_steps != 1:
            raise ValueError(f"TrainingArguments.gradient_accumulation_steps: {zo_optimizer} pairs one batch's "
                             f"outputs per step; use 1 and a larger per_device_train_batch_size")
        if not args.dataloader_drop_last:
            raise ValueError(f"TrainingArguments.dataloader_drop_last: {zo_optimizer} pairs outputs of batches of "
                             f"one size; set it to True")


def _shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(sum, count) of a causal LM's cross-entropy: position t's logits predict ``labels`` (already
    shifted, -100 ignored) at t."""
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total, float(labels.ne(-100).sum())


class ZOTrainer(Trainer):
    """A `transformers.Trainer` with a zeroth-order step (see the module docstring for the hooks)."""

    def __init__(self, model=None, args: TrainingArguments | None = None, *rest, zo_optimizer: str = "mezo",
                 zo_options: dict | None = None, zo_backend: str | None = None,
                 zo_deepspeed_config: str | None = None, zo_master_weights: bool = False,
                 zo_fsdp_shard_size: int | str | None = None, zo_zero3_shard_size: int | str | None = None,
                 zo_replicate_small_params: int = 0, zo_max_stalled_steps: int = 50,
                 zo_objective="loss", zo_reward_weights: list[float] | None = None, zo_max_new_tokens: int = 16,
                 zo_stop: tuple[str, ...] = ("\n",), zo_dual_forward: bool = False, **kwargs):
        """zo_optimizer, zo_options: as for ``zoscale.build_optimizer`` (the same names, options and
        checks; ``seed`` defaults to ``args.seed``, ``lr`` to ``args.learning_rate``). zo_backend:
        None (whole parameters on every rank), "fsdp" or "deepspeed" (zoscale shards ``model``);
        zo_deepspeed_config: a ZeRO-3 JSON for "deepspeed" (configs/deepspeed/, e.g. with offload).
        zo_master_weights: an fp32 copy of half-precision trainable weights (without zo_backend).
        zo_fsdp_shard_size: with zo_backend "fsdp", ranks per shard group, replicas across groups
        ("auto": one node's ranks), as ``fsdp_shard_size`` in zoscale train's config;
        zo_zero3_shard_size: the same for zo_backend "deepspeed" (``zero3_shard_size``).
        zo_replicate_small_params: with zo_backend, parameters of at most this many elements stay
        whole on every rank (``replicate_small_params``; a zo_deepspeed_config sets its own).
        zo_max_stalled_steps: consecutive steps that change nothing (a projected gradient of exactly
        0, or a loss equal to the last bit) before training stops with StalledRun (0: never).
        zo_objective: what a step minimizes (the module docstring); zo_reward_weights: one per
        reward function; zo_max_new_tokens, zo_stop: the greedy generation of f1, exact_match and
        rewards."""
        check_trainer_hooks()
        args = args or TrainingArguments("trainer_output")
        self.zo_objective, rewards = resolve_objective(zo_objective, zo_reward_weights)
        generates = self.zo_objective in GENERATING
        if self.zo_objective != "loss" and {"outputs", "gradient"} & set(REGISTRY[zo_optimizer].needs):
            raise ValueError(f"zo_objective: {zo_optimizer} differentiates the loss; {self.zo_objective} has no "
                             f"gradient")
        if generates:
            if kwargs.get("processing_class") is None:
                raise ValueError(f"zo_objective: {self.zo_objective} generates text; pass processing_class (the "
                                 f"tokenizer)")
            if args.remove_unused_columns:
                raise ValueError(f"TrainingArguments.remove_unused_columns: zo_objective {self.zo_objective} reads the "
                                 f"dataset's prompt column (and the reward functions its others); set it to False")
            columns = getattr(kwargs.get("train_dataset"), "column_names", None) or []
            needed = ["prompt"] + (["answers"] if self.zo_objective != "reward" else [])
            missing = [c for c in needed if columns and c not in columns]
            if missing:
                raise ValueError(f"train_dataset: zo_objective {self.zo_objective} needs the column(s) {missing}")
            kwargs["data_collator"] = kwargs.get("data_collator") or Rows.collate
        if dict(zo_options or {}).get("population"):
            raise ValueError("zo_options population: the Trainer splits every batch over all ranks; a population "
                             "needs each replica to see the whole batch (zoscale train supports it)")
        if zo_dual_forward:
            if not REGISTRY[zo_optimizer].pairs:
                raise ValueError(f"zo_dual_forward: {zo_optimizer} does not take its losses as (+eps, -eps) pairs")
            if self.zo_objective != "loss" or type(self).compute_loss is not Trainer.compute_loss:
                raise ValueError("zo_dual_forward: computes the causal-LM loss on labels itself; not with another "
                                 "zo_objective or an overridden compute_loss")
        self.zo_dual_forward, self.dual = zo_dual_forward, None
        self.zo_name, self.zo_options, self.zo = zo_optimizer, dict(zo_options or {}), None
        check = {"lr": args.learning_rate, "weight_decay": args.weight_decay, **self.zo_options}
        if check.get("schedule", "constant") != "constant":
            check.setdefault("total_steps", check.get("warmup_steps", 0) + 1)  # the Trainer's, once known
        zoscale.optimizer_config(zo_optimizer, **check)
        check_arguments(args, zo_optimizer, zo_backend, self.zo_options)
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ValueError("optimizers: ZOTrainer builds its own (zo_optimizer, zo_options); leave optimizers out")
        if zo_master_weights and zo_backend is not None:
            raise ValueError(f"zo_master_weights: not with zo_backend {zo_backend!r} (keep the shards in fp32)")
        self.zo_master_dtype = torch.float32 if zo_master_weights else None
        if zo_deepspeed_config is not None:
            if zo_backend != "deepspeed":
                raise ValueError("zo_deepspeed_config: needs zo_backend='deepspeed'")
            check_deepspeed_json(zo_deepspeed_config)
        if zo_fsdp_shard_size is not None and zo_backend != "fsdp":
            raise ValueError("zo_fsdp_shard_size: shard groups are FSDP2's; needs zo_backend='fsdp'")
        if zo_zero3_shard_size is not None and zo_backend != "deepspeed":
            raise ValueError("zo_zero3_shard_size: shard groups of ZeRO-3; needs zo_backend='deepspeed'")
        if zo_replicate_small_params and (zo_backend is None or zo_deepspeed_config is not None):
            raise ValueError("zo_replicate_small_params: needs zo_backend 'fsdp' or 'deepspeed' without "
                             "zo_deepspeed_config (whose stage3_param_persistence_threshold sets it)")
        self.zo_backend = backends.get(zo_backend, zo_deepspeed_config, fsdp_shard_size=zo_fsdp_shard_size,
                                       zero3_shard_size=zo_zero3_shard_size,
                                       replicate_small_params=zo_replicate_small_params) if zo_backend else None
        if self.zo_backend is not None:
            _, device = self.zo_backend.setup(args.ddp_timeout)
            model = self.zo_backend.prepare(model.to(device), device)
        if zo_master_weights and (args.deepspeed or args.fsdp):
            raise ValueError("zo_master_weights: not with the Trainer's sharding (keep the shards in fp32)")
        super().__init__(model, args, *rest, **kwargs)
        check_trainer_hooks(self)
        self.comm = Comm()
        self.sharding = self.zo_backend  # whose shards, head and gathered state dict: set once the model is sharded
        self._micro_batches: list = []
        self._since_log: list = []
        self.stall = StallWatch(zo_max_stalled_steps, same_values=self.zo_objective == "loss")
        sharded = (self.zo_backend is not None or bool(args.deepspeed or args.fsdp)) and self.comm.world_size > 1
        self.measure = Measure(self.zo_objective, self.processing_class, self.args.device, sharded, rewards,
                               zo_max_new_tokens, zo_stop) if generates else None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``resume_from_checkpoint=True`` takes the newest *complete* checkpoint: the Trainer would
        take the newest directory, which a kill during a save leaves without its state."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _last_complete_checkpoint(self) -> str:
        found = sorted(Path(self.args.output_dir).glob("checkpoint-*"),
                       key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name.rsplit("-", 1)[1].isdigit() else -1)
        for candidate in reversed(found):
            problem = None
            try:
                json.loads((candidate / "trainer_state.json").read_text())
            except (OSError, ValueError):
                problem = "no readable trainer_state.json"
            if problem is None and checkpoint.find(candidate / _ZO_STATE / "checkpoints", self.comm).path is None:
                problem = f"no complete ZO state ({_ZO_STATE}/)"
            if problem is None:
                return str(candidate)
            logger.warning(f"resume_from_checkpoint: skipping {candidate.name}, {problem} (a save was interrupted)")
        raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {self.args.output_dir}")

    # -- the optimizer ------------------------------------------------------------------------------
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Under the Trainer's DeepSpeed or FSDP: the model alone through accelerator.prepare (no
        optimizer for ZeRO-3 or FSDP2 to hold states of), then the ZO optimizer over its shards."""
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self._created_lr_scheduler:
            self.lr_scheduler, self._created_lr_scheduler = None, False
        model = self.accelerator.prepare(self.model)
        if self.is_fsdp_enabled:
            self.model = model  # the Trainer's convention: the FSDP-wrapped model is the model
        self.model_wrapped = model
        if self.is_deepspeed_enabled:
            self.deepspeed = model
        self.sharding = backends.get("deepspeed" if self.is_deepspeed_enabled else "fsdp")
        self.create_optimizer()
        self.create_scheduler(num_training_steps=max_steps)
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return model, train_dataloader

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            module = self.model
            if self.sharding is not None:
                shards, shard_comm = self.sharding.shards(module, None)
            else:
                shards, shard_comm = local_shards(module, master_dtype=self.zo_master_dtype), None
            own_schedule = "lr" in self.zo_options or "schedule" in self.zo_options
            options = {"seed": self.args.seed, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay,
                       **self.zo_options}
            if options.get("schedule", "constant") != "constant":
                options.setdefault("total_steps", self.state.max_steps)
            self.zo = zoscale.build_optimizer(self.zo_name, shards, comm=self.comm, shard_comm=shard_comm, **options)
            if self.zo_dual_forward:
                self.dual = DualForward(module, self.zo.config.distribution, self.zo.config.stream)
            self.optimizer = LrCarrier(self.zo.config.lr)
            if not own_schedule:
                self.zo.lr_source = lambda step: self.optimizer.param_groups[0]["lr"]
        return self.optimizer

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        if training and not isinstance(model, _NoDDP) and self.comm.world_size > 1:
            return _NoDDP(model)
        return model

    # -- the step -----------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._micro_batches = batches
        return batches, items

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if not self._micro_batches:  # the update's ZO step ran at its first micro-batch
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = [self._prepare_inputs(b) for b in self._micro_batches], []
        model.eval()  # no dropout: the forwards of one step must see one function
        result = self.zo.step(self.objective_for(model, batches))
        self._since_log.append(result)
        warning = self.stall.observe(result)  # StalledRun past the limit
        if warning:
            logger.warning(warning)
        return torch.tensor(result.loss, device=self.args.device)

    def objective_for(self, model, batches: list[dict]) -> Objective:
        """This rank's micro-batches as the closure protocol: the item-weighted loss of
        ``compute_loss`` (the model's own loss by default), the whole training set's for MeZO-SVRG's
        anchors, and a causal LM's body/head split for PseuZO."""
        pair = None if self.dual is None else lambda terms: self._pair_loss(model, batches, terms)
        return Objective(loss=lambda: self._loss(model, batches), full_loss=lambda: self._full_loss(model),
                         outputs=lambda kind: self._outputs(batches[0], kind), pair=pair)

    def _pair_loss(self, model, batches, terms) -> list[tuple[float, float]]:
        """(sum, count) of the shifted cross-entropy at theta + terms and at theta - terms, each
        micro-batch forwarded once, taken twice (engine/dual.py)."""
        sides = [[0.0, 0.0], [0.0, 0.0]]
        for inputs in batches:
            inputs = dict(inputs)
            labels = inputs.pop("labels")[:, 1:]
            doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.no_grad(), self.compute_loss_context_manager(), self.dual.pair(terms, rows=2 * len(labels)):
                logits = model(**doubled).logits
            for side, half in zip(sides, logits.chunk(2)):
                total, count = _shifted_lm_loss(half, labels)
                side[0], side[1] = side[0] + float(total), side[1] + count
        return [tuple(side) for side in sides]

    def _loss(self, model, batches) -> tuple[float, float]:
        """The objective's (sum, count) over this rank's micro-batches."""
        total = count = 0.0
        with torch.no_grad(), self.compute_loss_context_manager():
            for inputs in batches:
                if self.measure is not None:
                    value, n = self.measure.generated_value(causal_lm(self.model), self._encoded(inputs["rows"]))
                elif self.zo_objective == "accuracy":
                    value, n = self._accuracy(model, inputs)
                else:
                    n = self._items(inputs)
                    value = float(self.compute_loss(model, dict(inputs))) * n
                total, count = total + value, count + n
        return total, count

    def _encoded(self, rows: list[dict]) -> list[Encoded]:
        tok = self.processing_class
        out = []
        for row in rows:
            answers = row.get("answers", [])
            out.append(Encoded(tok(row["prompt"])["input_ids"], [], None, [],
                               [answers] if isinstance(answers, str) else list(answers), row["prompt"],
                               {k: v for k, v in row.items() if k != "prompt"}))
        return out

    def _accuracy(self, model, inputs: dict) -> tuple[float, float]:
        """Minus the label tokens (a classifier: rows) that the logits' argmax gets right, and their count."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        if logits.dim() == 2 and labels.dim() == 1:  # a classifier: a label per row
            return -float((logits.argmax(-1) == labels).sum()), float(labels.numel())
        if self._loss_shifts_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        scored = labels.ne(-100)
        return -float(((logits.argmax(-1) == labels) & scored).sum()), float(scored.sum())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The objective's mean as ``eval_loss`` (minus the accuracy, F1 or reward), when it is not the loss."""
        if self.zo_objective == "loss":
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        model.eval()
        total, count = self._loss(model, [inputs])
        return torch.tensor(total / max(count, 1.0), device=self.args.device), None, None

    def _items(self, inputs: dict) -> float:
        """What the model's mean loss averages over: label tokens (shifted for a causal LM), else rows."""
        labels = inputs.get("labels")
        if labels is None:
            return float(len(next(iter(inputs.values()))))
        if self._loss_shifts_labels:
            labels = labels[..., 1:]
        return float(labels.ne(-100).sum()) if labels.dtype in (torch.long, torch.int) else float(labels.shape[0])

    def _full_loss(self, model) -> tuple[float, float]:
        """The whole training set (this rank's share of it), in evaluation-sized batches."""
        loader = self.get_eval_dataloader(self.train_dataset)
        total = count = 0.0
        for inputs in loader:
            t, c = self._loss(model, [self._prepare_inputs(inputs)])
            total, count = total + t, count + c
        return total, count

    def _outputs(self, inputs: dict, kind: str):
        """(the last hidden state or the logits, the token-summed loss as a function of it): the
        causal-LM cross-entropy on ``labels``, whatever ``compute_loss`` says."""
        lm = causal_lm(self.model)
        split = self.sharding.split if self.sharding is not None else BodyHead()
        if not hasattr(lm, "get_output_embeddings") or lm.get_output_embeddings() is None:
            raise ValueError(f"{self.zo_name}: needs a causal LM with an output embedding (its body/head split)")
        labels = inputs["labels"][:, 1:]

        def loss_of(logits):
            return _shifted_lm_loss(logits, labels)

        with torch.no_grad():
            hidden = split.body(self.model, inputs["input_ids"], inputs.get("attention_mask"))
            if kind == "logits":
                return split.head(self.model, hidden), loss_of
        return hidden, lambda h: loss_of(split.head(self.model, hidden=h))

    # -- logging, evaluation, saving ------------------------------------------------------------------
    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._since_log:  # a training log: the ZO step's own numbers
            done = [r for r in self._since_log if math.isfinite(r.projected_grad)]
            logs.pop("grad_norm", None)
            if done:
                logs["projected_grad"] = sum(r.projected_grad for r in done) / len(done)
            logs["learning_rate"] = self._since_log[-1].lr
            self._since_log = []
        super().log(logs, start_time)

    def evaluation_loop(self, *args, **kwargs):
        if self.zo is not None:
            self.zo.flush()  # a deferred update belongs to the parameters evaluated
        return super().evaluation_loop(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.zo is not None:
            self.zo.flush()
        if self.sharding is None:
            return super().save_model(output_dir, _internal_call)
        state = self.sharding.full_state_dict(self.model)  # a collective: every rank is here
        self._save(output_dir or self.args.output_dir, state_dict=state if self.args.should_save else {})
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # the Trainer would save their optimizers' files
            if self.args.should_save:
                torch.save(self.optimizer.state_dict(), Path(output_dir) / OPTIMIZER_NAME)
                torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)
        else:
            super()._save_optimizer_and_scheduler(output_dir)  # the lr carrier and the scheduler
        zo = self.zo
        checkpoint.save(Path(output_dir) / _ZO_STATE, self.state.global_step, zo.shards, zo.shard_buffers(),
                        zo.state_dict(buffers=False), {"optimizer": self.zo_name}, self.comm, zo.writes_pieces, keep=1)

    def _load_optimizer_and_scheduler(self, resume_from: str | None) -> None:
        if resume_from is None:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            self.optimizer.load_state_dict(torch.load(Path(resume_from) / OPTIMIZER_NAME, weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(Path(resume_from) / SCHEDULER_NAME, weights_only=True))
        else:
            super()._load_optimizer_and_scheduler(resume_from)
        found = checkpoint.find(Path(resume_from) / _ZO_STATE / "checkpoints", self.comm)
        if found.path is None:
            raise ValueError(f"resume_from_checkpoint: {resume_from} holds no complete ZO state "
                             f"({_ZO_STATE}/); it was not written by ZOTrainer, or its save was interrupted")
        state, _ = checkpoint.load(found.path, self.comm)
        checkpoint.read_shards(found.path, self.zo.shards, self.zo.shard_buffers())
        self.zo.load_state_dict(state)

    def _load_best_model(self) -> None:
        """Sharded (zo_backend, or the Trainer's DeepSpeed / FSDP): the best checkpoint's parameters
        are its ZO state's pieces, each rank reading its own elements as resume does (the Trainer's
        loaders expect whole weights or its own engines' checkpoints, which ZOTrainer does not write)."""
        if self.sharding is None:
            return super()._load_best_model()
        best = Path(self.state.best_model_checkpoint)
        found = checkpoint.find(best / _ZO_STATE / "checkpoints", self.comm)
        if found.path is None:
            raise ValueError(f"load_best_model_at_end: {best} holds no complete ZO state ({_ZO_STATE}/)")
        self.zo.flush()  # a deferred update belongs to the parameters being replaced
        checkpoint.read_shards(found.path, self.zo.shards)
        logger.info(f"Loaded the best model from {best} (score: {self.state.best_metric}), each rank its own elements.")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.zo_backend is None:  # sharded: the parameters come from the ZO state's pieces instead
            super()._load_from_checkpoint(resume_from_checkpoint, model)

