"""`zoscale demo`: MeZO finetunes a tiny OPT, built from a config, on a synthetic prompt task, on CPU.

The task: 8 filler tokens with one keyword hidden among them, then a separator; the model must
answer with the label word of the keyword's class. It is scored like MeZO's classification tasks:
the log-likelihood of each candidate label word after the prompt, cross-entropy over candidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import OPTConfig, OPTForCausalLM

import zoscale

SEPARATOR, LABEL_WORDS = 2, (3, 4)  # token ids: the prompt ends with SEPARATOR, answers are LABEL_WORDS
KEYWORDS = ((5, 6, 7, 8), (9, 10, 11, 12))  # class 0 and class 1 keywords
FILLER_START = 13


@dataclass
class DemoConfig:
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    eps: float = 1e-3
    seed: int = 0
    eval_examples: int = 512
    vocab_size: int = 64
    prompt_length: int = 8


def make_model(cfg: DemoConfig) -> OPTForCausalLM:
    torch.manual_seed(cfg.seed)
    config = OPTConfig(vocab_size=cfg.vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config).eval()


def make_batch(cfg: DemoConfig, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(FILLER_START, cfg.vocab_size, (size, cfg.prompt_length), generator=generator)
    labels = torch.randint(0, 2, (size,), generator=generator)
    keyword_pool = torch.tensor(KEYWORDS)
    keywords = keyword_pool[labels, torch.randint(0, 4, (size,), generator=generator)]
    where = torch.randint(0, cfg.prompt_length, (size,), generator=generator)
    tokens[torch.arange(size), where] = keywords
    prompts = torch.cat([tokens, torch.full((size, 1), SEPARATOR)], dim=1)
    return prompts, labels


@torch.inference_mode()
def candidate_logits(model, prompts: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of each one-token candidate answer after the prompt: (batch, candidates)."""
    logits = model(input_ids=prompts).logits[:, -1]
    return F.log_softmax(logits.float(), dim=-1)[:, list(LABEL_WORDS)]


def accuracy(model, prompts, labels) -> float:
    return (candidate_logits(model, prompts).argmax(-1) == labels).float().mean().item()


def run(cfg: DemoConfig) -> dict:
    model = make_model(cfg)
    eval_prompts, eval_labels = make_batch(cfg, cfg.eval_examples, torch.Generator().manual_seed(10_000 + cfg.seed))
    before = accuracy(model, eval_prompts, eval_labels)
    opt = zoscale.build_optimizer("mezo", model, lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, defer_update=True)
    data = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="mezo", unit="step", mininterval=1.0)
    for step in bar:
        prompts, labels = make_batch(cfg, cfg.batch_size, data)
        result = opt.step(lambda: F.cross_entropy(candidate_logits(model, prompts), labels).item())
        if step % 200 == 0:
            bar.set_postfix(loss=f"{result.loss:.3f}", pg=f"{result.projected_grad:+.2f}")
    opt.flush()
    after = accuracy(model, eval_prompts, eval_labels)
    return {"eval_before": before, "eval_after": after, "steps": cfg.steps, "seconds": time.time() - start,
            "parameters": sum(p.numel() for p in model.parameters())}
