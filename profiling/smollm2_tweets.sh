#!/usr/bin/env bash
# The real-model comparison of issue 14 on a CPU: SmolLM2-135M-Instruct on labelled tweets, its
# RMSNorm weights trained by MeZO, ConMeZO, MeZO-SVRG and PseuZO at equal forward passes.
#   bash profiling/smollm2_tweets.sh sweep DIR   # learning rates on the dev split (1 seed, 100 MeZO steps)
#   bash profiling/smollm2_tweets.sh main DIR    # 3 seeds, 150 MeZO steps, the rates the sweep chose
#   bash profiling/smollm2_tweets.sh icl DIR     # the in-context baselines: 0, 4 and 16 shots
#   bash profiling/smollm2_tweets.sh rescore DIR # main's runs' last parameters scored again (DIR/rescored)
#   bash profiling/smollm2_tweets.sh balanced DIR # main's setup on equal numbers of each label (100 steps)
# Needs `pip install 'zoscale[real]' && zoscale real-inputs --out real-inputs` first. One thread a run
# (OMP_NUM_THREADS=1), JOBS runs at a time (2: one per core of a 2-core machine). Each stage continues
# where it stopped.
set -euo pipefail
stage=$1 out=$2
config=configs/real/smollm2_tweets_compare_cpu.yaml
ZO=mezo,conmezo,mezo_svrg,pseuzo  # the ZO optimizers (compare's default adds the first-order baselines)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$stage" = sweep ]; then
  # test is not read in the sweep: a small sample keeps its evaluations cheap
  for lr in 3e-5 1e-4 3e-4; do
    zoscale compare --config "$config" --optimizers "$ZO" --seeds 1 --steps 100 --evals 2 --out "$out/lr-$lr" data.num_test=50 \
      optim.lr=$lr mezo_svrg:optim.anchor_lr=$lr mezo_svrg:optim.q=8
  done
elif [ "$stage" = main ]; then
  # the rates with the best dev score in the sweep (profiling/reports/smollm2-tweets-2026-12-03-cpu/README.md)
  zoscale compare --config "$config" --optimizers "$ZO" --seeds 3 --steps 150 --evals 3 --jobs "${JOBS:-2}" --out "$out" \
    mezo:optim.lr="${MEZO_LR:-3e-4}" conmezo:optim.lr="${CONMEZO_LR:-3e-4}" pseuzo:optim.lr="${PSEUZO_LR:-3e-5}" \
    mezo_svrg:optim.lr="${SVRG_LR:-3e-5}" mezo_svrg:optim.anchor_lr="${SVRG_LR:-3e-5}" mezo_svrg:optim.q=8
elif [ "$stage" = icl ]; then
  # 16 demonstrations need long prompts: cut to 96 tokens, they fall below chance
  mkdir -p "$out"
  for shots in 0 4 16; do
    zoscale eval --config "$config" --shots $shots --out "$out/shots-$shots.json" data.max_length=2048
  done
elif [ "$stage" = rescore ]; then
  # runs made before the evaluation reported balanced accuracy: their final checkpoints, evaluated again
  mkdir -p "$out/rescored"
  for run in "$out"/runs/*/; do
    name=$(basename "$run")
    [ -f "$out/rescored/$name.json" ] || zoscale eval --run "$run" --out "$out/rescored/$name.json"
  done
elif [ "$stage" = balanced ]; then
  # the tweets are 84% negative: every positive tweet and as many negative ones, in each split
  mkdir -p "$out/data"
  python - "$out/data" <<'PY'
import json, random, sys
for split in ("train", "validation"):
    rows = [json.loads(line) for line in open(f"real-inputs/tweets/{split}.jsonl")]
    positive = [r for r in rows if r["label"] == 1]
    negative = random.Random(0).sample([r for r in rows if r["label"] == 0], len(positive))
    kept = {id(r) for r in positive + negative}
    with open(f"{sys.argv[1]}/{split}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if id(r) in kept)
PY
  zoscale compare --config "$config" --optimizers "$ZO" --seeds 3 --steps 100 --evals 2 --jobs "${JOBS:-2}" --out "$out/compare" \
    data.path="$(realpath "$out/data")" \
    mezo:optim.lr="${MEZO_LR:-3e-4}" conmezo:optim.lr="${CONMEZO_LR:-3e-4}" pseuzo:optim.lr="${PSEUZO_LR:-3e-5}" \
    mezo_svrg:optim.lr="${SVRG_LR:-3e-5}" mezo_svrg:optim.anchor_lr="${SVRG_LR:-3e-5}" mezo_svrg:optim.q=8
else
  echo "usage: $0 sweep|main|icl|rescore|balanced DIR" >&2
  exit 2
fi
