#!/usr/bin/env bash
# Choosing CAP-f's representation and loss balance on MiniLM/SST-2 without looking at the dev set (issue #15):
# the scale study's setting at 2,000 sentences (preset minilm/sst2_reproduction, 2 retraining epochs per step),
# with 2,000 training rows held out as the eval split `trainval` (data.validation_from_train=2000, seed 42) and
# evaluated on it alone. Candidates: the paper's settings, the checkpoint's own pooling (contrast.pooling=auto: mean
# for all-MiniLM-L6-v2), a 10x smaller unsupervised weight, both, and the no-contrast baseline; seeds 1-3. The
# finished runs go to results/minilm-sst2-select/ (cap.report: one row per candidate, the `settings` column). The
# chosen setting is then run once on dev (the scale study's sizes). Not yet run: about 6 minutes a run on 2 idle
# cores, 15 runs.
# Usage: scripts/select_contrast_minilm_sst2.sh [work dir, default multiruns/minilm-sst2-select] [--report-only]
set -euo pipefail
STUDY=minilm-sst2-select
source "$(dirname "$0")/study.sh"
run() {
    (cd "$work" && python -m cap -m experiment=minilm/sst2_reproduction prune.retrain_epochs=2 \
        data.validation_from_train=2000 data.eval_split=trainval seed=1,2,3 hydra.sweep.dir="$work/sweeps/$1" \
        "${@:2}")
}
if ! $report_only; then
    run candidates contrast.pooling=cls,auto contrast.unsup_weight=0.3,0.03
    run baseline contrast.enabled=false
fi
"$repo/scripts/collect_finished_runs.sh" "$work/sweeps" "$out/runs"
cd "$repo"
python -m cap.report "$out/runs" --out "$out"
