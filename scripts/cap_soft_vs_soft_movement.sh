#!/usr/bin/env bash
# CAP-soft against soft movement pruning without contrastive terms (issue #15, the paper's unstructured claim at the
# one movement variant that learns at CPU scale): preset minilm/sst2_cap_soft (MiniLM, 2,000 SST-2 sentences, 10
# epochs, the controller steering to 90 %), contrast.enabled=true,false, seeds 1-3, the subset and the teacher pinned
# to seed 42; then cap.report of the finished runs into results/minilm-sst2-cap-soft-vs-soft/ (CAP-soft = ablation
# "full", soft movement = "baseline"). Re-running resumes. About 12 minutes a CAP-soft run and 10 a soft-movement
# run on 2 idle cores; seeds 1-3 are committed. They ran the old path (fp32, random batches, the teacher recomputed;
# their configs say so): to run them again as they ran, append trainer.precision=fp32 data.group_by_length=false
# teacher.cache_outputs=false to the command below.
# Usage: scripts/cap_soft_vs_soft_movement.sh [work dir, default multiruns/minilm-sst2-cap-soft-vs-soft] [--report-only]
set -euo pipefail
STUDY=minilm-sst2-cap-soft-vs-soft
source "$(dirname "$0")/study.sh"
if ! $report_only; then
    (cd "$work" && python -m cap -m experiment=minilm/sst2_cap_soft data.seed=42 teacher.seed=42 seed=1,2,3 \
        contrast.enabled=true,false hydra.sweep.dir="$work/sweeps")
fi
collect "$work/sweeps" "$out/runs"
cd "$repo"
python -m cap.report "$out/runs" --out "$out"
