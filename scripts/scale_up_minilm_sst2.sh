#!/usr/bin/env bash
# CAP nearer the paper's budget (issue #28): the scale study (results/minilm-sst2-scale/) at 8,000 sentences with
# three seeds and at 32,000, and movement pruning at about 5,000 updates. SST-2, MiniLM, the full dev set read once
# per run (every epoch for the movement runs); no setting chosen on dev. The runs extend results/minilm-sst2-scale/
# and results/minilm-sst2-movement/ (see the end). One teacher per training-set size (subset and
# teacher pinned to seed 42), shared by every arm and seed of that size.
#
# Paths. CAP-f runs the new defaults (bf16 where the CPU has it, length-grouped batches, the teacher's outputs
# cached: on the main job they leave CAP-f's accuracy within the seed spread, README "Speed"); so 8,000-sentence seed 1
# is run again on this path, and the committed old-path runs of results/minilm-sst2-scale/ stay as they are, beside
# it. Movement runs use random batches (length-grouped batches cost CAP-soft about two points) and log their curves
# every 10 updates.
#
# Groups, in this order, each resumable (re-running the script goes on where it stopped); the minutes are estimates
# from the rates measured on an AMD EPYC with AVX512-BF16 (2 cores: results/bench/train.json, a CAP-f retraining
# epoch at 129.5 sentences/s, the packed importance pass at 218, encoding at about 420; movement epochs at the
# tuned-baseline study's pace of about 9.5 minutes per 2,000-sentence 10-epoch run):
#   cap_f-8k      8,000 sentences (1,000 updates per step), seeds 1-3, CAP-f and the baseline     6 runs x ~9 min
#   chosen-8k     8,000, seeds 1-3, the selection study's choice (pooling auto, unsup 0.03)      3 runs x ~9 min
#   cap_f-32k     32,000 sentences (4,000 updates per step), seeds 1-3, CAP-f and the baseline     6 runs x ~36 min
#   chosen-32k    32,000, seeds 1-3, the choice                                                   3 runs x ~36 min
#   movement-16k  16,000 sentences, 10 epochs (5,000 updates at batch 32), seed 1: CAP-m, plain movement,
#                 magnitude Top-K, CAP-soft and soft movement (tuned)                               5 runs x ~76 min
# About 13 hours in all, plus one teacher per size: several sessions. Not run: the full training set (67,349
# sentences) with the paper's own schedule (nine 10 % steps, 2 epochs each, batch 16: 8,420 updates per step), about
# 3.5 hours per arm on this machine by the same rates; its command is the `full` group below (`--group full`).
# Usage: scripts/scale_up_minilm_sst2.sh [work dir, default multiruns/minilm-sst2-scale-up] [--group NAME]
#        [--report-only]
set -euo pipefail
STUDY=minilm-sst2-scale-up
only="" args=()
while (($#)); do
    if [[ "$1" == --group ]]; then only=$2; shift 2; else args+=("$1"); shift; fi
done
source "$(dirname "$0")/study.sh" "${args[@]}"
cap_f() {  # the scale study's preset: 2 retraining epochs per step, steps 50 / 70 / 90 %
    (cd "$work" && python -m cap -m experiment=minilm/sst2_reproduction prune.retrain_epochs=2 \
        hydra.sweep.dir="$work/sweeps/$1" "${@:2}")
}
movement() {
    (cd "$work" && python -m cap -m "experiment=minilm/sst2_$2" data.max_train_samples=16000 data.seed=42 \
        teacher.seed=42 seed=1 data.group_by_length=false trainer.logging_steps=10 \
        hydra.sweep.dir="$work/sweeps/$1" "${@:3}")
}
group() { [[ -z "$only" || "$only" == "$1" ]]; }
chosen="contrast.pooling=auto contrast.unsup_weight=0.03"  # results/minilm-sst2-select/choice.json
if ! $report_only; then
    if group cap_f-8k; then cap_f cap_f-8k data.max_train_samples=8000 seed=1,2,3 contrast.enabled=true,false; fi
    # shellcheck disable=SC2086
    if group chosen-8k; then cap_f chosen-8k data.max_train_samples=8000 seed=1,2,3 $chosen; fi
    if group cap_f-32k; then cap_f cap_f-32k data.max_train_samples=32000 seed=1,2,3 contrast.enabled=true,false; fi
    # shellcheck disable=SC2086
    if group chosen-32k; then cap_f chosen-32k data.max_train_samples=32000 seed=1,2,3 $chosen; fi
    if group movement-16k; then
        movement movement-16k cap_m contrast.enabled=true
        movement movement-16k cap_m contrast.enabled=false prune.criterion=topk,magnitude
        movement movement-16k cap_soft contrast.enabled=true
        # soft movement as the tuned baseline of issue #27 (score lr and loss balance chosen on trainval)
        # shellcheck disable=SC2046
        movement movement-16k cap_soft contrast.enabled=false $(python -c "import json, sys; \
print(' '.join(json.load(open(sys.argv[1]))['overrides']))" "$repo/results/minilm-sst2-soft-baseline/choice.json")
    fi
    if [[ "$only" == full ]]; then  # the paper's own budget: nine steps, 2 epochs each, the whole training set
        (cd "$work" && python -m cap -m experiment=minilm/sst2_reproduction data.max_train_samples=null seed=1 \
            prune.sequence=[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9] prune.retrain_epochs=2 \
            contrast.enabled=true,false hydra.sweep.dir="$work/sweeps/full")
    fi
fi
# the finished runs extend the committed studies: CAP-f into results/minilm-sst2-scale/runs/<group>, movement into
# results/minilm-sst2-movement/runs/movement-16k; then both studies' tables and plots are rebuilt
scale=$repo/results/minilm-sst2-scale movement_out=$repo/results/minilm-sst2-movement
for g in cap_f-8k chosen-8k cap_f-32k chosen-32k full; do
    if [[ -d "$work/sweeps/$g" ]]; then collect "$work/sweeps/$g" "$scale/runs/$g"; fi
done
if [[ -d "$work/sweeps/movement-16k" ]]; then collect "$work/sweeps/movement-16k" "$movement_out/runs/movement-16k"; fi
cd "$repo"
# the teachers' own dev accuracy: the scale-up's teachers are in the work dir; the earlier studies' rows (teachers
# no longer on disk) stay as the tables have them
python scripts/teacher_table.py "$scale/runs" "$repo/results/minilm-sst2-select/runs/dev" --work "$work" \
    --out "$scale/teachers.md"
python scripts/teacher_table.py "$movement_out/runs" --work "$work" --out "$movement_out/teachers.md"
python -m cap.report "$scale/runs" --out "$scale/report"
python scripts/scale_report.py "$scale/runs" "$repo/results/minilm-sst2-select/runs/dev" --out "$scale"
python -m cap.report "$movement_out/runs" --out "$movement_out"
