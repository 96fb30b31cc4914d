#!/usr/bin/env bash
# The GPU measurements of issues 6 (memory) and 7 (speed), in two calls of the device tool, each
# under its 10-minute limit. Prepare the wheels the GPU machine lacks, once, on the dev machine:
#     bash ../shared/tools/device-wheels.sh                                  # deepspeed, datasets -> .whl/
#     python3 -m pip download -q --no-deps -d .whl dacite==1.9.2 pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0
# then, with the device tool (carry: [".whl"]):
#     bash profiling/gpu_session.sh speed      # kernel tests; SASS counts under this machine's Triton;
#                                              # step benchmarks: 1.3B, 13B, 30B, FSDP2 and
#                                              # ZeRO-3 at world size 1, ZeRO-3 with offload_param cpu (1.3B),
#                                              # FSDP2 CPU offload against local on the quickstart
#     bash profiling/gpu_session.sh memory     # zoscale profile: OPT-1.3B and OPT-13B at 16x128 and 16x512 (6 min)
# Every report goes into one archive, $OUT/STAGE.tgz (the tool brings back at most 8 files), with
# the log beside it; unpack it under profiling/reports/ and commit what you keep.
# Knobs: MODEL_SMALL, MODEL_LARGE, MODEL_XL (config.json paths), REPEATS.
set -uo pipefail
stage=${1:?usage: gpu_session.sh speed|memory}
out=${OUT:-/tmp/gpu-session}
small=${MODEL_SMALL:-configs/models/opt-1.3b.json}
large=${MODEL_LARGE:-configs/models/opt-13b.json}
xl=${MODEL_XL:-configs/models/opt-30b.json}
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
    tar czf "$out/$stage.tgz" -C "$reports" . 2>/dev/null
}
step() {  # one step benchmark; a failure or overrun is logged and the session goes on
    echo "== bench step $* (at ${SECONDS}s)"
    timeout -k 10 "${LIMIT:-240}" python3 -m zoscale bench step --out "$reports" --force --repeats "$repeats" "$@" || echo "FAILED: bench step $*"
    save
}
step_ranks1() {  # the same under torchrun with one rank (FSDP2 and ZeRO-3 need a process group)
    echo "== torchrun bench step $* (at ${SECONDS}s)"
    timeout -k 10 "${LIMIT:-240}" torchrun --standalone --nproc_per_node 1 -m zoscale bench step --out "$reports" --force --repeats "$repeats" "$@" \
        || echo "FAILED: torchrun bench step $*"
    save
}
profile() {
    echo "== profile $* (at ${SECONDS}s)"
    timeout -k 10 "${LIMIT:-300}" python3 -m zoscale profile --config configs/profile/opt-1.3b.yaml --force "$@" || echo "FAILED: profile $*"
}

case $stage in
speed)
    echo "== kernel and optimizer tests on the GPU"
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_rng.py tests/test_engine.py \
        tests/test_mezo.py tests/test_conmezo.py 2>&1 | tail -8
    echo "== SASS instructions per element under this machine's Triton (at ${SECONDS}s): the meter's prediction"
    timeout -k 10 240 python3 profiling/sass_count.py --json "$reports/sass.json" || echo "FAILED: sass_count"
    # FSDP2's CPU offload runs only with CUDA: the quickstart for 200 steps, offloaded and local, same numbers?
    quick=(steps=200 eval_every=0 save_every=0 data.num_dev=0 data.num_test=50)
    python3 -m zoscale train --out "$reports/quick-local" "${quick[@]}" || echo "FAILED: quickstart local"
    torchrun --standalone --nproc_per_node 1 -m zoscale train --out "$reports/quick-fsdp-offload" "${quick[@]}" \
        backend=fsdp fsdp_cpu_offload=true || echo "FAILED: quickstart fsdp_cpu_offload"
    grep -h param_sq_sum "$reports"/quick-*/summary.json
    for run in local fsdp-offload; do  # the first steps' losses and projected gradients, side by side
        python3 -c "import json,sys; print(sys.argv[1], [(r['loss'], r['projected_grad']) for r in map(json.loads, open(sys.argv[2])) if 'loss' in r][:4])" \
            "$run" "$reports/quick-$run/metrics.jsonl" || true
    done
    rm -rf "$reports"/quick-*/checkpoints
    step --model "$small" --optimizer mezo
    step --model "$small" --optimizer conmezo
    step --model "$large" --optimizer mezo
    step --model "$large" --optimizer mezo --defer-update
    step --model "$large" --optimizer conmezo
    step_ranks1 --model "$small" --backend fsdp --dtype bfloat16
    step_ranks1 --model "$small" --backend deepspeed --dtype bfloat16
    step --model "$xl" --optimizer mezo --repeats 3
    # ZeRO-3 with the partitions in host memory: the engine stages them through the kernels a chunk
    # at a time; it runs last, under its own time limit.
    LIMIT=120 step_ranks1 --model "$small" --backend deepspeed --deepspeed-config configs/deepspeed/zero3_offload.json \
        --repeats 2
    ;;
memory)
    for seq in 128 512; do
        profile --seq "$seq" --out "$reports/opt-1.3b-16x$seq" "model.config=$small"
        profile --seq "$seq" --out "$reports/opt-13b-16x$seq" "model.config=$large" --optimizers mezo,conmezo,adamw
    done
    # ConMeZO's fp32 momentum does not fit OPT-13B at 512 tokens on 80 GB; a bf16 one should
    profile --seq 512 --out "$reports/opt-13b-16x512-bf16-momentum" "model.config=$large" --optimizers conmezo \
        optim.buffer_dtype=bfloat16
    ;;
*)
    echo "unknown stage $stage (speed | memory)"; exit 2 ;;
esac
save
echo "wrote $out/$stage.tgz"
