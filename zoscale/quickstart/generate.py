"""Regenerate the quickstart's shipped data and tokenizer (deterministic):

    python -m zoscale.quickstart.generate

sst2/{train,validation}.jsonl: short synthetic movie reviews in SST-2's schema (sentence, label),
whose sentiment is carried by one or two adjectives among neutral words. tokenizer/: a word-level
tokenizer over exactly the words the data and the SST-2 prompt use.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOUNS = ["movie", "film", "story", "plot", "acting", "cast", "script", "ending", "soundtrack", "director",
         "dialogue", "pacing", "humor", "camera", "lead"]
POSITIVE = ["great", "wonderful", "brilliant", "moving", "charming", "delightful", "superb", "clever", "beautiful",
            "fresh"]
NEGATIVE = ["terrible", "boring", "dull", "awful", "bad", "weak", "tedious", "messy", "bland", "painful"]
ADVERBS = ["really", "quite", "very", "truly", "rather", "honestly", "simply"]
SHAPES = [
    "the {noun} was {adv} {adj} .",
    "i thought the {noun} was {adj} and {adj2} .",
    "{adv} , the {noun} felt {adj} .",
    "a {adj} {noun} and a {adj2} {noun2} .",
    "overall the {noun} is {adj} .",
]
PROMPT_WORDS = ["It", "was", "great", "terrible"]


def review(rand: random.Random) -> dict:
    label = rand.randint(0, 1)
    words = POSITIVE if label else NEGATIVE
    sentence = rand.choice(SHAPES).format(noun=rand.choice(NOUNS), noun2=rand.choice(NOUNS), adv=rand.choice(ADVERBS),
                                          adj=rand.choice(words), adj2=rand.choice(words))
    return {"sentence": sentence, "label": label}


def vocabulary() -> list[str]:
    words = set(NOUNS + POSITIVE + NEGATIVE + ADVERBS + PROMPT_WORDS)
    for shape in SHAPES:
        words.update(w for w in shape.split() if not w.startswith("{"))
    return sorted(words)


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    rand = random.Random(2026)
    (HERE / "sst2").mkdir(exist_ok=True)
    for split, count in (("train", 2000), ("validation", 600)):
        lines = [json.dumps(review(rand)) for _ in range(count)]
        (HERE / "sst2" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(HERE / "tokenizer")
    print(f"vocabulary of {len(vocab)} tokens; data in {HERE / 'sst2'}")


if __name__ == "__main__":
    main()
