"""A ZOTrainer run on the quickstart's tiny OPT and reviews, as a Trainer script would be written.

    python tests/scripts/hf_trainer.py OUT [key=value ...]          (one process, or under torchrun)

Keys: optimizer, backend (none | fsdp | deepspeed: zoscale shards the model; trainer-deepspeed,
trainer-fsdp: the Trainer's own integrations, TrainingArguments(deepspeed=...) or fsdp=..., the
latter on CUDA), steps, batch (the global batch), accumulation, save_steps, resume (a checkpoint
directory, or "last": the newest complete one in OUT/run), lr, dtype, master (fp32 master weights),
save_model, weight_decay, dual (zo_dual_forward), small (zo_replicate_small_params),
objective (loss, or reward: the prompts' greedy words scored by the quickstart's reward function),
best (evaluate at every save and load the best model at the end, the first evaluation being best).
Every rank writes OUT/rank{r}.json: the Trainer's log history, the parameter checksum (and, with
best, the checksum at each save and the best checkpoint) and the files of OUT/run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

TOKENIZER = Path(__file__).resolve().parents[2] / "zoscale" / "quickstart" / "tokenizer"
REVIEWS = Path(__file__).resolve().parents[2] / "zoscale" / "quickstart" / "sst2" / "train.jsonl"
ZERO3 = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"
# as users' ZeRO-3 JSONs usually have it: the Trainer fills the persistence threshold (10 x hidden
# size), so the norms and biases are kept whole and the matrices partitioned
ZERO3_AUTO = {**json.loads(ZERO3.read_text()), "zero_optimization": {"stage": 3,
                                                                     "stage3_param_persistence_threshold": "auto"}}
TRAINER_SHARDING = {"trainer-deepspeed": {"deepspeed": ZERO3_AUTO, "use_cpu": True},
                    "trainer-fsdp": {"fsdp": "full_shard", "fsdp_config": {
                        "version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": ["OPTDecoderLayer"]}}}
TINY_OPT = dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, max_position_embeddings=64,
                word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=1, dropout=0.0,
                attention_dropout=0.0)


def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def model(vocab_size: int, seed: int = 0, dtype: str = "float32"):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=vocab_size, **TINY_OPT)).to(getattr(torch, dtype)).eval()


def dataset(tok, rows: int = 64):
    """Reviews followed by their verdict, as causal-LM text."""
    from datasets import Dataset

    lines = [json.loads(line) for line in REVIEWS.read_text().splitlines()[:rows]]
    texts = [f"{r['sentence']} It was {'great' if r['label'] else 'terrible'}" for r in lines]
    return Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])


def prompts(rows: int = 64):
    """Reviews as prompts with their labels (TRL's layout: a prompt column and the others)."""
    from datasets import Dataset

    lines = [json.loads(line) for line in REVIEWS.read_text().splitlines()[:rows]]
    return Dataset.from_list([{"prompt": f"{r['sentence']} It was", "label": r["label"]} for r in lines])


def parameter_sum(trainer) -> float:
    """The trainable parameters' sum over every rank's shards (a collective)."""
    trainer.zo.flush()
    return trainer.zo.param_sums([sum(float(s.tensor.double().sum()) for s in trainer.zo.shards if s.primary)])[0]


def main(out: Path, options: dict) -> None:
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from zoscale.integrations.transformers import ZOTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch, accumulation = int(options.get("batch", 8)), int(options.get("accumulation", 1))
    tok = tokenizer()
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=int(options.get("steps", 6)),
                             per_device_train_batch_size=batch // world // accumulation,
                             gradient_accumulation_steps=accumulation, learning_rate=float(options.get("lr", 1e-3)),
                             lr_scheduler_type=options.get("schedule", "constant"), logging_steps=1,
                             save_steps=int(options.get("save_steps", 1000)), save_strategy="steps", report_to=[],
                             train_sampling_strategy="sequential", seed=0, dataloader_drop_last=True,
                             weight_decay=float(options.get("weight_decay", 0.0)),
                             disable_tqdm=True, **TRAINER_SHARDING.get(options.get("backend", "none"), {"use_cpu": True}))
    backend = options.get("backend", "none")
    if options.get("objective", "loss") == "reward":
        args.remove_unused_columns = False
        data = {"train_dataset": prompts(), "zo_objective": "zoscale.quickstart.rewards:sentiment_word",
                "zo_max_new_tokens": 2, "zo_max_stalled_steps": 0}
    else:
        data = {"train_dataset": dataset(tok), "data_collator": DataCollatorForLanguageModeling(tok, mlm=False)}
    if options.get("best"):  # the first evaluation as "best" (eval_earliness): not the last parameters
        data["eval_dataset"] = dataset(tok, rows=16)
        args.eval_strategy, args.eval_steps, args.load_best_model_at_end = "steps", args.save_steps, True
        args.metric_for_best_model, args.greater_is_better = "eval_earliness", True
    eps = 0.03 if options.get("objective") == "reward" else 1e-3
    trainer = ZOTrainer(model=model(len(tok), dtype=options.get("dtype", "float32")), args=args,
                        processing_class=tok, **data,
                        zo_optimizer=options.get("optimizer", "mezo"), zo_options={"eps": eps},
                        zo_backend=backend if backend in ("fsdp", "deepspeed") else None,
                        zo_replicate_small_params=int(options.get("small", 0)),
                        zo_master_weights=bool(int(options.get("master", 0))),
                        zo_dual_forward=bool(int(options.get("dual", 0))))
    saved = {}  # step -> the parameters' sum at each save, for the best model's reload
    if options.get("best"):
        from transformers import TrainerCallback

        class SumAtSave(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                state.eval_steps = state.save_steps = args.save_steps  # a resumed state keeps its own

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                metrics["eval_earliness"] = -state.global_step

            def on_save(self, args, state, control, **kwargs):
                saved[state.global_step] = parameter_sum(trainer)

        trainer.add_callback(SumAtSave())
    resume = options.get("resume")
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    if options.get("save_model"):
        trainer.save_model(str(out / "model"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {"log": trainer.state.log_history, "param_sum": parameter_sum(trainer), "world_size": world,
              "saved": saved, "best": trainer.state.best_model_checkpoint,
              "kept_whole": [s.name for s in trainer.zo.shards if s.numel == s.global_numel],
              "files": sorted(str(p.relative_to(out)) for p in (out / "run").rglob("*") if p.is_file())}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:]))
