"""ZOSFTTrainer: TRL's SFTTrainer (chat data through its own processing) with a ZO step."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from tests.distributed import REPO

pytest.importorskip("trl")
sys.path.insert(0, str(REPO / "tests" / "scripts"))
import hf_trainer  # noqa: E402

WORDS = {"good": "yes", "great": "yes", "bad": "no", "awful": "no"}


def chats() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"is {word} {i} positive?"},
                          {"role": "assistant", "content": answer}]}
            for i in range(8) for word, answer in WORDS.items()]


def trainer(out, steps: int, **config):
    from datasets import Dataset
    from trl import SFTConfig

    from zoscale.integrations.trl import ZOSFTTrainer

    tok = hf_trainer.tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    # SFTConfig's own defaults otherwise (gradient_checkpointing on, a linear schedule)
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
                     save_steps=2, report_to=[], use_cpu=True, seed=0, learning_rate=config.pop("lr", 1e-3),
                     disable_tqdm=True, train_sampling_strategy="sequential", max_length=64, **config)
    return ZOSFTTrainer(model=hf_trainer.model(len(tok)), args=args, train_dataset=Dataset.from_list(chats()),
                        eval_dataset=Dataset.from_list(chats()[:8]), processing_class=tok, zo_options={"eps": 1e-3})


def training_logs(t) -> list[dict]:
    return [r for r in t.state.log_history if "projected_grad" in r]


def parameter_sum(t) -> float:
    return sum(float(p.double().sum()) for p in t.model.parameters())


def test_sft_trains_on_chats_with_its_metrics_as_training_metrics(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        t = trainer(tmp_path, steps=40, lr=3e-3, eval_strategy="steps", eval_steps=40)
    assert "gradient_checkpointing turned off" in caplog.text and not t.args.gradient_checkpointing
    tokens = int(t.data_collator([t.train_dataset[i] for i in range(4)])["attention_mask"].sum())
    t.train()
    logs = training_logs(t)
    assert len(logs) == 40 and not any(k.startswith("eval_") for r in logs for k in r)
    assert all({"entropy", "mean_token_accuracy", "num_tokens"} <= set(r) for r in logs)
    assert logs[0]["num_tokens"] == tokens  # counted once per step, not once per forward
    assert all(b["num_tokens"] > a["num_tokens"] for a, b in zip(logs, logs[1:]))
    evaluated = [r for r in t.state.log_history if "eval_loss" in r]
    # evaluation keeps SFTTrainer's own metrics (its eval_num_tokens: the training tokens seen so far)
    assert evaluated and "eval_entropy" in evaluated[0] and evaluated[0]["eval_num_tokens"] == logs[-1]["num_tokens"]
    early = sum(r["loss"] for r in logs[:10]) / 10
    late = sum(r["loss"] for r in logs[-10:]) / 10
    assert late < early - 0.05, (early, late)


def test_sft_resumes_bit_exact(tmp_path):
    straight = trainer(tmp_path / "straight", steps=6)
    straight.train()
    from transformers import TrainerCallback

    class StopAfterStep2(TrainerCallback):  # as a killed job would, after the checkpoint of step 2
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    first = trainer(tmp_path / "resumed", steps=6)
    first.add_callback(StopAfterStep2())
    first.train()
    assert first.state.global_step == 2 and (tmp_path / "resumed" / "checkpoint-2" / "zoscale").is_dir()
    resumed = trainer(tmp_path / "resumed", steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    pairs = [(r["loss"], r["projected_grad"]) for r in training_logs(resumed)]
    assert pairs == [(r["loss"], r["projected_grad"]) for r in training_logs(straight)]
    assert parameter_sum(resumed) == parameter_sum(straight)
    assert torch.isfinite(torch.tensor(pairs)).all()
