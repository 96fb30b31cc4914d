#!/usr/bin/env bash
# The lower bounds pyproject.toml declares, installed together in a fresh venv, and a smoke subset
# run on them (issue 27 item 2): the quickstart, ZOTrainer, ZOSFTTrainer (TRL), LoRA, a GGUF input
# and one sharded run (FSDP2 on 2 gloo ranks).
#   bash profiling/dependency_floors.sh OUT     # OUT/README.md: the versions installed and each check
# [project.dependencies] and the test extra are resolved to their lowest versions (uv's
# --resolution lowest-direct); the report lists, beside each declared floor, the version installed:
# where they differ, the declared floor cannot be installed with the others and is not the truth.
set -uo pipefail
out=${1:?usage: dependency_floors.sh OUT}
venv=${VENV:-/tmp/zoscale-floors}
mkdir -p "$out"
out=$(realpath "$out")
requirements=$(python3 - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
PY
)
rm -rf "$venv" && python3 -m venv "$venv" && . "$venv/bin/activate"
log="$out/install.log"
pip install -q uv > "$log" 2>&1
echo "$requirements" > "$venv/requirements.txt"
uv pip install --resolution lowest-direct -r "$venv/requirements.txt" >> "$log" 2>&1 \
  || { echo "FAILED: the floors do not resolve (see $log)"; tail -20 "$log"; exit 1; }
uv pip install --no-deps -e . >> "$log" 2>&1
{
  echo "# zoscale on its declared dependency floors"
  echo
  echo "Run by profiling/dependency_floors.sh on $(date -u +%F), $(uname -m), Python $(python --version | cut -d' ' -f2)."
  echo
  echo "| requirement (pyproject.toml) | installed |"
  echo "| --- | --- |"
  echo "$requirements" | while read -r spec; do
    name=${spec%%[<>=~!]*}
    echo "| \`$spec\` | $(pip show "$name" 2>/dev/null | sed -n 's/^Version: //p') |"
  done
  echo
  echo "| check | result | seconds |"
  echo "| --- | --- | --- |"
} > "$out/README.md"
check() {  # NAME COMMAND...: one row of the report, the output in OUT/NAME.log
  local name=$1; shift
  local start=$SECONDS
  if timeout -k 10 600 "$@" > "$out/$name.log" 2>&1; then result=passed; else result="FAILED (exit $?, $name.log)"; fi
  echo "| $name | $result | $((SECONDS - start)) |" >> "$out/README.md"
  echo "$name: $result"
}
check quickstart zoscale train --out "$venv/run-quickstart" steps=200 eval_every=0 save_every=100
check zotrainer python -m pytest -q -p no:cacheprovider tests/test_hf_trainer.py -k "each_optimizer and mezo or resume_from_checkpoint_continues"
check trl python -m pytest -q -p no:cacheprovider tests/test_trl.py
check lora-gguf python -m pytest -q -p no:cacheprovider tests/test_gguf.py tests/test_pipeline.py -k "gguf or lora"
check fsdp-2-ranks python -m pytest -q -p no:cacheprovider tests/test_fsdp.py -k "follow and 2-conmezo"
check zero3-2-ranks python -m pytest -q -p no:cacheprovider tests/test_deepspeed.py -k "gathers_a_layer_at_a_time"
pip list --format=freeze > "$out/pip-freeze.txt" 2>/dev/null
cat "$out/README.md"
