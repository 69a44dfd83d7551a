#!/usr/bin/env bash
# The long GRPO experiment of issue 13 §2 (docs/grpo_results.md, commands of docs/compare.md §2), resumable across
# sittings and machines: every finished (arm, seed) is copied into docs/results/grpo_experiment/ (made_by.json,
# train.json, result.json, the base evaluations, the report), which is committed; a new sitting restores those into
# the run folder, so `wmss compare` skips them and runs only what is missing.
#
#   bash scripts/grpo_experiment.sh [ARMS] [SEEDS]      # default: vanilla,wmss  0,1,2,3,4
#
# Every run uses the code of one commit (CODE_COMMIT, checked out in a worktree), so that changes to main cannot
# change an experiment halfway. The SFT checkpoints (weak = step 250, strong = step 400 of `wmss demo`, 2 MB each)
# are stored with the results and restored from there; their sha256 is checked against the stored one.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARMS=${1:-vanilla,wmss}
SEEDS=${2:-0,1,2,3,4}
CODE_COMMIT=1958cb0
SNAP=${SNAP:-/tmp/wmss_grpo_experiment_$CODE_COMMIT}
PY=${PY:-$ROOT/.venv/bin/python}
STORE=docs/results/grpo_experiment
EXP=runs/grpo_exp
RUN=$EXP/demo/seed0-w250-s150-h128x3-b32-lr0.003
# PYTHONSAFEPATH: `python -m` (this script's and every `wmss grpo` child's) must not put the working directory (this
# checkout, whose code changes) ahead of PYTHONPATH; without it the runs of 2026-12-02 imported main's wmss_trl
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$SNAP PYTHONSAFEPATH=1
cd "$ROOT"

[ -d "$SNAP" ] || git worktree add --detach "$SNAP" "$CODE_COMMIT"
[ "$(git -C "$SNAP" rev-parse --short=7 HEAD)" = "$CODE_COMMIT" ] || { echo "$SNAP is not at $CODE_COMMIT" >&2; exit 1; }
mkdir -p "$EXP" "$STORE"

# 1. the SFT checkpoints (stored with the results: `wmss demo` is not bit-reproducible across CPUs), the held-out
#    prompts, the two control weak models
if [ -f "$STORE/models/strong/model.safetensors" ] && [ ! -f "$RUN/strong/model.safetensors" ]; then
  mkdir -p "$RUN" && cp -r "$STORE/models/weak" "$STORE/models/strong" "$RUN/"
fi
if [ ! -f "$RUN/strong/model.safetensors" ]; then
  "$PY" -m wmss_trl.cli demo --output_dir "$EXP/demo" --arms sft --arm_steps 1
fi
(cd "$RUN" && sha256sum weak/model.safetensors strong/model.safetensors) > "$EXP/models.sha256"
if [ -f "$STORE/models.sha256" ]; then
  cmp -s "$EXP/models.sha256" "$STORE/models.sha256" || {
    echo "the SFT checkpoints in $RUN differ from the ones the stored results were made with:" >&2
    diff "$STORE/models.sha256" "$EXP/models.sha256" >&2
    echo "fix: delete $RUN (the stored ones in $STORE/models are then used), or move $STORE away and start over." >&2
    exit 1
  }
else
  cp "$EXP/models.sha256" "$STORE/models.sha256"
fi
[ -d "$STORE/models/strong" ] || { mkdir -p "$STORE/models" && cp -r "$RUN/weak" "$RUN/strong" "$STORE/models/"; }
if [ ! -f "$EXP/weak_uniform/model.safetensors" ]; then
  "$PY" - <<EOF
from transformers import AutoTokenizer
from wmss_trl.recipes.demo import control_weak_model
from wmss_trl.tasks import load_embedded
load_embedded("arith", sizes={"test": 600})["test"].to_json("$EXP/heldout600.jsonl")
weak = "$RUN/weak"
for kind in ("shuffled", "uniform"):  # same weak model, vocabulary permuted / uniform next token
    control_weak_model(weak, kind).save_pretrained("$EXP/weak_" + kind)
    AutoTokenizer.from_pretrained(weak).save_pretrained("$EXP/weak_" + kind)
EOF
fi

# 2. the config: the demo's GRPO settings, 300 steps at a constant LR, and the ablation arms
cat > "$EXP/run.yaml" <<EOF
model_name_or_path: $RUN/strong
weak_model_name_or_path: $RUN/weak
dataset_name: wmss:arith
reward_funcs: [wmss_trl.tasks.correctness_reward]
max_steps: 300
learning_rate: 5.0e-5
lr_scheduler_type: constant
per_device_train_batch_size: 32
num_generations: 8
max_completion_length: 40
temperature: 1.0
beta: 0.0
loss_type: dapo
num_weak_generations: 2
entropy_weighted_advantages: true
bf16: false
activation_checkpointing: false
report_to: none
logging_steps: 10
save_strategy: 'no'
arms:
  negatives_only: {entropy_weighted_advantages: false}
  wmss_bounded: {entropy_weight_max: 5.0}
  entropy_only: {num_weak_generations: 0}
  entropy_only_bounded: {num_weak_generations: 0, entropy_weight_max: 5.0}
  kl_to_weak_only: {beta: 0.04, num_weak_generations: 0, entropy_weighted_advantages: false}
  all_bounded: {beta: 0.04, entropy_weight_max: 5.0}
  weak_shuffled: {weak_model_name_or_path: $EXP/weak_shuffled}
  weak_uniform: {weak_model_name_or_path: $EXP/weak_uniform}
EOF

# 3. restore the finished runs, keep copying the new ones (and their logged metrics) into the store while compare runs
store() {
  (cd "$EXP/compare" 2>/dev/null && find . \( -name made_by.json -o -name result.json \
    -o \( -name trainer_state.json -not -path '*/checkpoint-*' \) \
    -o -path './base/*.json' -o -name 'compare.*' -o -name '*.png' \) -print0 | xargs -0 -r cp --parents -t "$ROOT/$STORE/compare") || true
}
mkdir -p "$EXP/compare" "$STORE/compare"
cp -rn "$STORE/compare/." "$EXP/compare/"
(while sleep 120; do store; done) &
SYNC=$!
trap 'kill $SYNC 2>/dev/null; store' EXIT

"$PY" -m wmss_trl.cli compare --config "$EXP/run.yaml" --arms "$ARMS" --seeds "$SEEDS" \
  --eval_dataset "$EXP/heldout600.jsonl" --k 1,2,4,8,16 --eval_steps 100 --equal_time \
  --per_device_eval_batch_size 50 --output_dir "$EXP/compare"
