#!/usr/bin/env bash
# The movement presets on the new defaults (trainer.precision=auto, data.group_by_length=true,
# teacher.cache_outputs=true; issue #25) beside their committed old-path runs (fp32, random batches, the teacher
# recomputed): CAP-soft as in scripts/cap_soft_vs_soft_movement.sh (results/minilm-sst2-cap-soft-vs-soft/), seeds 1-3,
# and CAP-m as in scripts/movement_vs_magnitude_minilm_sst2.sh (results/minilm-sst2-movement/), seed 1. Do they run
# without NaN, and collapse no more than fp32 does? Then CAP-soft seed 1 with one default taken back at a time
# (data.group_by_length=false; trainer.precision=fp32): which one moves its accuracy. The finished runs' metrics.json
# and configs go to results/minilm-sst2-new-defaults/runs/ (their configs record the precision they resolved).
# Re-running resumes.
# Usage: scripts/new_defaults_movement.sh [work dir, default multiruns/minilm-sst2-new-defaults] [--report-only]
set -euo pipefail
STUDY=minilm-sst2-new-defaults
source "$(dirname "$0")/study.sh"
cap_soft() {  # run dir name, then extra overrides
    (cd "$work" && python -m cap experiment=minilm/sst2_cap_soft data.seed=42 teacher.seed=42 "${@:2}" \
        hydra.run.dir="$work/sweeps/$1")
}
if ! $report_only; then
    for seed in 1 2 3; do
        cap_soft "cap_soft_seed$seed" seed=$seed
    done
    (cd "$work" && python -m cap experiment=minilm/sst2_cap_m data.max_train_samples=1000 data.seed=42 \
        teacher.seed=42 seed=1 hydra.run.dir="$work/sweeps/cap_m")
    cap_soft cap_soft_seed1_random_batches seed=1 data.group_by_length=false
    cap_soft cap_soft_seed1_fp32 seed=1 trainer.precision=fp32
fi
collect "$work/sweeps" "$out/runs"
