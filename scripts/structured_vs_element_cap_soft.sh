#!/usr/bin/env bash
# Does CAP-soft keep its accuracy when its scores are structured (issue #18)? prune.granularity=structured (one score
# per attention head and per FFN neuron) against the paper's element scores, both CAP-soft with the λ controller
# steering to 90 % of the encoder matrices' entries, preset minilm/sst2_cap_soft (MiniLM, 2,000 SST-2 sentences,
# 10 epochs), the subset and teacher pinned to seed 42, seeds 1-3. No setting is chosen here: the structured runs
# take the preset as it is, so dev is read once. The element runs are the CAP-soft runs of
# results/minilm-sst2-cap-soft-vs-soft (scripts/cap_soft_vs_soft_movement.sh, same overrides); the report reads
# both into results/minilm-sst2-structured-cap-soft/. About 13 minutes a run on 2 idle cores. Re-running resumes.
# Usage: scripts/structured_vs_element_cap_soft.sh [work dir, default multiruns/minilm-sst2-structured-cap-soft]
#        [--report-only]
set -euo pipefail
STUDY=minilm-sst2-structured-cap-soft
source "$(dirname "$0")/study.sh"
if ! $report_only; then
    (cd "$work" && python -m cap -m experiment=minilm/sst2_cap_soft data.seed=42 teacher.seed=42 seed=1,2,3 \
        prune.granularity=structured hydra.sweep.dir="$work/sweeps")
fi
collect "$work/sweeps" "$out/runs"
cd "$repo"
python -m cap.report "$out/runs" results/minilm-sst2-cap-soft-vs-soft/runs/sst2/cap_soft/contrast.enabled=True,* \
    --out "$out"
python scripts/epoch_curves.py "$out/runs" results/minilm-sst2-cap-soft-vs-soft/runs/sst2/cap_soft/contrast.enabled=True,* \
    --out "$out/epochs.png"
