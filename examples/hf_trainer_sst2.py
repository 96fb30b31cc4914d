"""Finetune a causal LM on SST-2-style reviews with a ZO optimizer, through transformers.Trainer.

On a CPU, with the quickstart's tiny OPT (random weights) and its reviews (a minute or two):
    python examples/hf_trainer_sst2.py --output_dir /tmp/zo-sst2 --max_steps 2000
On GPUs, OPT-13B partitioned by the Trainer's own ZeRO-3 integration (loaded straight into the
partitions), with SST-2 as JSON lines; deepspeed or torchrun launches it:
    deepspeed --num_gpus 8 examples/hf_trainer_sst2.py --model_name_or_path facebook/opt-13b \
        --deepspeed configs/deepspeed/zero3.json --bf16 \
        --data_dir DIR --learning_rate 1e-7 --max_steps 20000 --output_dir runs/opt13b-sst2
The Trainer's FSDP2 works too (--fsdp full_shard --fsdp_config with version 2 and
reshard_after_forward), and so does zoscale's own sharding: --zo_backend fsdp | deepspeed.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    OPTConfig,
    OPTForCausalLM,
    TrainingArguments,
)

from zoscale.integrations.transformers import ZOTrainer

QUICKSTART = Path(__file__).resolve().parents[1] / "zoscale" / "quickstart"


@dataclass
class ZOArguments:
    model_name_or_path: str | None = None  # default: the quickstart's tiny OPT, built from a config
    data_dir: str = str(QUICKSTART / "sst2")  # train.jsonl and validation.jsonl: {"sentence", "label"}
    zo_optimizer: str = "mezo"
    zo_eps: float = 1e-3
    zo_backend: str | None = None  # fsdp | deepspeed: zoscale shards the model (instead of --deepspeed / --fsdp)
    zo_deepspeed_config: str | None = None


def main():
    zo, args = HfArgumentParser((ZOArguments, TrainingArguments)).parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(zo.model_name_or_path or QUICKSTART / "tokenizer")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if zo.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(zo.model_name_or_path, dtype=dtype)
    else:  # tiny: built whole on every rank (a pretrained model above loads straight into ZeRO-3 partitions)
        torch.manual_seed(args.seed)
        model = OPTForCausalLM(OPTConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id))

    # SST-2's MeZO prompt as text to continue: "<sentence> It was great" / "... It was terrible"
    files = {"train": f"{zo.data_dir}/train.jsonl", "validation": f"{zo.data_dir}/validation.jsonl"}
    verdict = lambda ex: {"text": f"{ex['sentence']} It was {'great' if ex['label'] else 'terrible'}"}  # noqa: E731
    data = load_dataset("json", data_files=files).map(verdict)
    data = data.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=data["train"].column_names)

    trainer = ZOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                        processing_class=tokenizer, zo_optimizer=zo.zo_optimizer, zo_options={"eps": zo.zo_eps},
                        zo_backend=zo.zo_backend, zo_deepspeed_config=zo.zo_deepspeed_config)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    print(trainer.evaluate())


if __name__ == "__main__":
    main()
