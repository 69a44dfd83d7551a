#!/usr/bin/env bash
# The saturation benchmark of issue 11 (scripts/saturation.py, docs/saturation.md), resumable across sittings and
# machines. The results JSON (one row per finished (seed, arm), each with what made it) lives in
# docs/results/saturation.json and is committed as it grows; each seed's phase-A models (strong, weak, lag-weak:
# ~2 MB each) are kept in docs/results/saturation_models/seed<N>/ so that a later sitting runs the remaining arms of
# that seed from the same starting point (phase A is not bit-reproducible across CPUs: an AMD rerun of an Intel seed
# differed in the 2nd digit of the NLL after 13 epochs).
#
#   bash scripts/saturation_experiment.sh [SEEDS]      # default 0,1,2,3,4; re-run the same line to continue
#
# The measurement code is the script of one commit (CODE_COMMIT, in a worktree): the rows' fingerprint refuses rows
# made by another version anyway.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SEEDS=${1:-0,1,2,3,4}
CODE_COMMIT=5fcc07f
SNAP=${SNAP:-/tmp/wmss_saturation_code}
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/runs/saturation}
RESULTS=$ROOT/docs/results/saturation.json
MODELS=$ROOT/docs/results/saturation_models
export OMP_NUM_THREADS=1 PYTHONPATH=$SNAP

[ -d "$SNAP" ] || git -C "$ROOT" worktree add --detach "$SNAP" "$CODE_COMMIT"
[ "$(git -C "$SNAP" rev-parse --short=7 HEAD)" = "$CODE_COMMIT" ] || { echo "$SNAP is not at $CODE_COMMIT" >&2; exit 1; }
mkdir -p "$OUT" "$MODELS"
cp -rn "$MODELS/." "$OUT/"  # the stored phase-A models of the seeds started earlier

# keep the stored copies up to date while it runs: the results JSON, and each seed's phase-A models once its
# phase-A row exists (the models are final then)
store() {
  [ -f "$OUT/saturation.json" ] && cp "$OUT/saturation.json" "$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
  for seed_dir in "$OUT"/seed*; do
    [ -d "$seed_dir/phase_a/weak_lag" ] || continue
    seed=$(basename "$seed_dir")
    grep -q "\"$seed/phase_a\"" "$RESULTS" 2>/dev/null || continue
    [ -d "$MODELS/$seed" ] && continue
    mkdir -p "$MODELS/$seed/phase_a"
    cp "$seed_dir/made_by.json" "$MODELS/$seed/"
    for m in strong weak weak_lag; do cp -r "$seed_dir/phase_a/$m" "$MODELS/$seed/phase_a/"; done
  done
}
[ -f "$OUT/saturation.json" ] || { [ -f "$RESULTS" ] && cp "$RESULTS" "$OUT/saturation.json"; }
(while sleep 120; do store; done) &
SYNC=$!
trap 'kill $SYNC 2>/dev/null; store' EXIT

cd "$SNAP"
"$PY" scripts/saturation.py --seeds "$SEEDS" --output_dir "$OUT" --results "$OUT/saturation.json"
