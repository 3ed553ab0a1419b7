#!/usr/bin/env bash
# CAP-m at CPU scale (issue #15): CAP-m, plain movement pruning (contrast.enabled=false) and magnitude Top-K
# (contrast.enabled=false prune.criterion=magnitude) on the same cubic schedule to 90 %, preset minilm/sst2_cap_m
# on 1,000 SST-2 sentences (10 epochs, 320 updates: the budget that fitted beside the other studies; the preset's
# 2,000 sentences take about 13 minutes a CAP-m run), the subset and teacher pinned to seed 42, seed 1; then
# cap.report of the finished runs into results/minilm-sst2-movement/ (CAP-m = ablation "full", movement =
# "baseline", magnitude = "baseline,magnitude"). Re-running resumes.
# Usage: scripts/movement_vs_magnitude_minilm_sst2.sh [work dir, default multiruns/minilm-sst2-movement] [--report-only]
set -euo pipefail
STUDY=minilm-sst2-movement
source "$(dirname "$0")/study.sh"
run() {
    (cd "$work" && python -m cap -m experiment=minilm/sst2_cap_m data.max_train_samples=1000 data.seed=42 \
        teacher.seed=42 seed=1 hydra.sweep.dir="$work/sweeps/$1" "${@:2}")
}
if ! $report_only; then
    run cap_m
    run movement contrast.enabled=false prune.criterion=topk,magnitude
fi
collect "$work/sweeps" "$out/runs"
cd "$repo"
python -m cap.report "$out/runs" --out "$out"
