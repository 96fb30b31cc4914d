import pytest
import torch
import torch.nn.functional as F
from transformers import OPTConfig, OPTForCausalLM

from zoscale.engine.comm import Comm
from zoscale.train import evaluate as ev
from zoscale.train.data import Encoded
from zoscale.train.losses import Batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, pad_token_id=0, dropout=0.0)
    return OPTForCausalLM(cfg).eval()


EXAMPLES = [Encoded([1, 5, 6, 7], [[8], [9, 10]], 1, [9, 10], []), Encoded([1, 11], [[8], [9, 10]], 0, [8], [])]
# every candidate one token: the prompt is forwarded once and the candidates read at its end
SINGLE = [Encoded([1, 5, 6, 7], [[8], [9]], 1, [9], []), Encoded([1, 11], [[8], [9], [12]], 2, [12], [])]


def direct_logprob(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logprobs[len(prompt) - 1 + j, t] for j, t in enumerate(answer))


@pytest.mark.parametrize("examples,shared", [(EXAMPLES, False), (SINGLE, True), (EXAMPLES[:1] + SINGLE, False)])
def test_classification_loss_is_cross_entropy_over_mean_candidate_logprobs(model, examples, shared):
    batch = Batch(examples, "classification", 0, "cpu")
    assert batch.shared == shared
    assert batch.input_ids.shape[0] == (len(examples) if shared else sum(len(e.candidates) for e in examples))
    total, count = batch.loss(model)
    expected = 0.0
    with torch.no_grad():
        for ex in examples:
            scores = torch.stack([direct_logprob(model, ex.prompt, c) / len(c) for c in ex.candidates])
            expected -= F.log_softmax(scores, 0)[ex.label].item()
    assert count == len(examples) and total == pytest.approx(expected, rel=1e-5)
    assert batch.predictions(model).tolist() == [
        int(torch.stack([direct_logprob(model, ex.prompt, c) / len(c) for c in ex.candidates]).argmax())
        for ex in examples]


def test_lm_loss_is_the_answer_tokens_negative_log_likelihood(model):
    total, count = Batch(EXAMPLES, "lm", 0, "cpu").loss(model)
    with torch.no_grad():
        expected = -sum(direct_logprob(model, ex.prompt, ex.target) for ex in EXAMPLES).item()
    assert count == 3 and total == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("examples", [EXAMPLES, SINGLE])
@pytest.mark.parametrize("output", ["hidden", "logits"])
def test_pseuzo_head_gradient_equals_a_full_backward(model, output, examples):
    """e = d loss / d output by autograd through the head only, checked against a backward pass
    through the whole model with the output kept in the graph."""
    from zoscale.engine import local_shards
    from zoscale.optim.pseuzo import PseuZO, PseuZOConfig

    batch = Batch(examples, "classification", 0, "cpu")
    opt = PseuZO(local_shards(model), PseuZOConfig(lr=0.0))
    value, head = batch.outputs(model, output)
    _, _, grad = opt._head_gradient(value, head)

    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    inner = hidden if output == "hidden" else model.lm_head(hidden)
    inner.retain_grad()
    loss = batch.head_loss(model, hidden)[0] if output == "hidden" else \
        batch.loss_from_token_logprobs(batch.logprobs_from_logits(inner[batch.scored]))[0]
    loss.backward()
    torch.testing.assert_close(grad, inner.grad, rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_f1_and_exact_match():
    assert ev.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert ev.exact_match("the Eiffel tower", "Eiffel Tower.") == 1.0
    assert ev.f1_score("in Paris France", "Paris") == pytest.approx(0.5)
    assert ev.f1_score("London", "Paris") == 0.0


def test_generation_evaluation_runs_greedy_decoding():
    from transformers import AutoTokenizer

    from zoscale.quickstart import QUICKSTART

    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART.parent / "tokenizer")
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                     pad_token_id=tokenizer.pad_token_id, dropout=0.0)).eval()
    encode = lambda prompt, answer: Encoded(tokenizer(prompt)["input_ids"], [], None, [], [answer])  # noqa: E731
    examples = [encode("the movie was", "great"), encode("overall the plot is really", "dull")]
    metrics = ev.evaluate(model, tokenizer, examples, "generate", 2, tokenizer.pad_token_id, "cpu", Comm(),
                          max_new_tokens=3)
    assert metrics["examples"] == 2 and 0.0 <= metrics["f1"] <= 1.0 and 0.0 <= metrics["exact_match"] <= 1.0
    texts, _ = ev.generate(model, tokenizer, examples, 3, "cpu")
    assert len(texts) == 2 and all(1 <= len(t.split()) <= 3 for t in texts)  # three greedy words each


@pytest.mark.parametrize("output", ["hidden", "logits"])
def test_pseuzo_pairs_batches_that_score_different_numbers_of_tokens(model, output):
    """An answer of one token, then of two (lm objective): the window pairs them position by position."""
    import zoscale
    from zoscale.optim.base import Objective

    short = [Encoded([1, 5, 6], [], 0, [8], []), Encoded([1, 11, 12], [], 0, [9], [])]
    long = [Encoded([1, 5, 6], [], 0, [8, 9], []), Encoded([1, 13], [], 0, [9, 10], [])]
    opt = zoscale.build_optimizer("pseuzo", model, lr=1e-3, eps=1e-3, window=3, output=output)
    before = [p.detach().clone() for p in model.parameters()]
    for examples in (short, long, short):
        batch = Batch(examples, "lm", 0, "cpu")
        result = opt.step(Objective(outputs=lambda kind: batch.outputs(model, kind)))
        assert not result.skipped and len(result.projected_grads) == len(opt.window)
    assert len(opt.window) == 3 and any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with torch.no_grad():
        for p, q in zip(model.parameters(), before):
            p.copy_(q)  # the module-scoped model, as the other tests expect it


def test_label_word_evaluation_reports_balanced_accuracy_and_the_majority_share(model):
    """On skewed labels accuracy rewards always answering the common label; balanced accuracy (mean
    recall by gold label) does not. Fixed label words only: per-example candidates have no labels."""
    prompts = [[1, 5 + i % 7, 6 + i % 5, 7 + i % 3] for i in range(12)]
    examples = [Encoded(p, [[8], [9]], int(i % 4 == 0), [], []) for i, p in enumerate(prompts)]
    predicted = Batch(examples, "classification", 0, "cpu").predictions(model).tolist()
    pairs = list(zip(predicted, [e.label for e in examples]))
    recall = [sum(p == g for p, g in pairs if g == c) / sum(g == c for _, g in pairs) for c in (0, 1)]
    metrics = ev.evaluate(model, None, examples, "candidates", 5, 0, "cpu", Comm())
    assert metrics["accuracy"] == pytest.approx(sum(p == e.label for p, e in zip(predicted, examples)) / 12)
    assert metrics["balanced_accuracy"] == pytest.approx(sum(recall) / 2)
    assert metrics["majority"] == pytest.approx(9 / 12)
    assert "balanced_accuracy" not in ev.evaluate(model, None, SINGLE, "candidates", 2, 0, "cpu", Comm())
