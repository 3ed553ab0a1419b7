#!/usr/bin/env bash
# The movement presets on the new defaults (trainer.precision=auto, data.group_by_length=true,
# teacher.cache_outputs=true; issue #25), seed 1, beside their committed old-path runs (fp32, random batches, the
# teacher recomputed): CAP-soft as in scripts/cap_soft_vs_soft_movement.sh (results/minilm-sst2-cap-soft-vs-soft/)
# and CAP-m as in scripts/movement_vs_magnitude_minilm_sst2.sh (results/minilm-sst2-movement/). Do they run without
# NaN, and collapse no more than fp32 does? The finished runs' metrics.json and configs go to
# results/minilm-sst2-new-defaults/runs/ (their configs record the precision they resolved). Re-running resumes.
# Usage: scripts/new_defaults_movement.sh [work dir, default multiruns/minilm-sst2-new-defaults] [--report-only]
set -euo pipefail
STUDY=minilm-sst2-new-defaults
source "$(dirname "$0")/study.sh"
if ! $report_only; then
    (cd "$work" && python -m cap experiment=minilm/sst2_cap_soft data.seed=42 teacher.seed=42 seed=1 \
        hydra.run.dir="$work/sweeps/cap_soft")
    (cd "$work" && python -m cap experiment=minilm/sst2_cap_m data.max_train_samples=1000 data.seed=42 \
        teacher.seed=42 seed=1 hydra.run.dir="$work/sweeps/cap_m")
fi
"$repo/scripts/collect_finished_runs.sh" "$work/sweeps" "$out/runs"
