"""Masked LMs (RoBERTa-style, MeZO's medium models): the answer fills a mask at the prompt's end."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zoscale.quickstart import QUICKSTART
from zoscale.train.data import encode
from zoscale.train.losses import Batch
from zoscale.train.tasks import TASKS

ROBERTA = ("model.config={model_type: roberta, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, "
           "intermediate_size: 64, max_position_embeddings: 80, pad_token_id: 0, type_vocab_size: 1, "
           "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer over the quickstart's words, with <s> ... </s> and a <mask> token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from zoscale.quickstart.generate import vocabulary

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    out = tmp_path_factory.mktemp("tok") / "masked"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", mask_token="<mask>").save_pretrained(out)
    return out


def test_loss_is_cross_entropy_over_candidate_logits_at_the_mask(tokenizer_dir):
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=80,
                                             pad_token_id=0, type_vocab_size=1)).eval()
    sst2 = TASKS["sst2"]
    examples = [encode(sst2.build({"sentence": s, "label": y}), tokenizer, 64, masked=True)
                for s, y in (("the movie was great .", 1), ("overall the plot is dull .", 0))]
    assert all(e.prompt[-2] == tokenizer.mask_token_id for e in examples)  # ... It was <mask> </s>
    batch = Batch(examples, "masked", tokenizer.pad_token_id, "cpu", mask_id=tokenizer.mask_token_id)
    total, count = batch.loss(model)
    expected = 0.0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.prompt])).logits[0, e.prompt.index(tokenizer.mask_token_id)]
            expected -= F.log_softmax(logits[[c[0] for c in e.candidates]], 0)[e.label].item()
    assert count == 2 and total == pytest.approx(expected, rel=1e-5)


def train(tokenizer_dir, tmp_path, *extra):
    return subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(tmp_path / "run"),
                           "model.kind=masked", ROBERTA, f"model.tokenizer={tokenizer_dir}",
                           f"data.path={QUICKSTART.parent / 'sst2'}",
                           "steps=6", "eval_every=3", "save_every=0", "data.num_dev=8", "data.num_test=16", *extra],
                          capture_output=True, text=True, timeout=300)


def test_a_masked_lm_trains_and_evaluates(tokenizer_dir, tmp_path):
    done = train(tokenizer_dir, tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and "accuracy" in summary["eval_after"] and summary["param_sq_sum"] > 0


@pytest.mark.parametrize("extra,message", [
    (["data.task=squad"], "not a classification task"),
    (["optim.name=pseuzo"], "pseuzo needs a causal LM"),
])
def test_what_masked_lms_cannot_do_is_refused(tokenizer_dir, tmp_path, extra, message):
    done = train(tokenizer_dir, tmp_path, *extra)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_multi_token_candidates_are_refused(tokenizer_dir, tmp_path):
    spec = tmp_path / "two_words.yaml"
    spec.write_text("template: '{sentence} It was'\ncandidates: [' very great', ' terrible']\n")
    done = train(tokenizer_dir, tmp_path, f"data.task={spec}")
    assert done.returncode == 2 and "candidate ' very great' is 2 tokens" in done.stderr, done.stderr
