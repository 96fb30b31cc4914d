#!/usr/bin/env bash
# The real-model comparison of issue 14 on a CPU: SmolLM2-135M-Instruct on labelled tweets, its
# RMSNorm weights trained by MeZO, ConMeZO, MeZO-SVRG and PseuZO at equal forward passes.
#   bash profiling/smollm2_tweets.sh sweep DIR   # learning rates on the dev split (1 seed, 100 MeZO steps)
#   bash profiling/smollm2_tweets.sh main DIR    # 3 seeds, 150 MeZO steps, the rates the sweep chose
# Needs `pip install 'zoscale[real]' && zoscale real-inputs --out real-inputs` first. One thread a run
# (OMP_NUM_THREADS=1): a 2-core machine keeps a core for other work. Each stage continues where it stopped.
set -euo pipefail
stage=$1 out=$2
config=configs/real/smollm2_tweets_compare_cpu.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$stage" = sweep ]; then
  # test is not read in the sweep: a small sample keeps its evaluations cheap
  for lr in 3e-5 1e-4 3e-4; do
    zoscale compare --config "$config" --seeds 1 --steps 100 --evals 2 --out "$out/lr-$lr" data.num_test=50 \
      optim.lr=$lr mezo_svrg:optim.anchor_lr=$lr mezo_svrg:optim.q=8
  done
elif [ "$stage" = main ]; then
  # the rates with the best dev score in the sweep (profiling/reports/smollm2-tweets-2026-12-03-cpu/README.md)
  zoscale compare --config "$config" --seeds 3 --steps 150 --evals 3 --out "$out" \
    mezo:optim.lr="${MEZO_LR:?}" conmezo:optim.lr="${CONMEZO_LR:?}" pseuzo:optim.lr="${PSEUZO_LR:?}" \
    mezo_svrg:optim.lr="${SVRG_LR:?}" mezo_svrg:optim.anchor_lr="${SVRG_LR:?}" mezo_svrg:optim.q=8
else
  echo "usage: $0 sweep|main DIR" >&2
  exit 2
fi
