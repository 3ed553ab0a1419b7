#!/usr/bin/env bash
# The scale study committed under results/minilm-sst2-scale/ (issue #15): CAP-f vs the plain first-order baseline
# (contrast.enabled=false) on MiniLM/SST-2 as the training set grows, with the paper's 2 retraining epochs per step
# and 3 steps (50/70/90 %): preset minilm/sst2_reproduction with prune.retrain_epochs=2, one teacher per size (data
# subset and teacher pinned to seed 42, so a size's seeds share both), the full dev set. Groups run smallest first,
# seed 1 of every size before the other seeds; re-running the script resumes where it stopped. Then the finished
# runs' metrics.json and configs are copied to results/minilm-sst2-scale/runs/ and the tables and plots rebuilt:
# cap.report's report/table.md, report/table.csv, report/sst2.png (one row per size: the `settings` column) and
# scripts/scale_report.py's table.csv (per seed, with train_samples), gap.md and gap.png (CAP-f minus baseline vs
# updates per pruning step).
# Usage: scripts/scale_minilm_sst2.sh [work dir, default multiruns/minilm-sst2-scale] [--report-only]
set -euo pipefail
STUDY=minilm-sst2-scale
source "$(dirname "$0")/study.sh"
# run from the work dir: the teachers are cached under $work/runs/teachers
run() {
    (cd "$work" && python -m cap -m experiment=minilm/sst2_reproduction prune.retrain_epochs=2 \
        hydra.sweep.dir="$work/sweeps/$1" "${@:2}")
}
if ! $report_only; then
    run seed1 data.max_train_samples=1000,2000,8000 seed=1 contrast.enabled=true,false
    run seeds23 data.max_train_samples=1000,2000 seed=2,3 contrast.enabled=true,false
    run seeds23-8k data.max_train_samples=8000 seed=2,3 contrast.enabled=true,false
    run seed1-16k data.max_train_samples=16000 seed=1 contrast.enabled=true,false
fi
collect "$work/sweeps" "$out/runs"
cd "$repo"
python -m cap.report "$out/runs" --out "$out/report"
python scripts/scale_report.py "$out/runs" --out "$out"
