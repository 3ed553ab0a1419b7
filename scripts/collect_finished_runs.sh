#!/usr/bin/env bash
# Copy the metrics.json, config and training log (trainer_log.jsonl, where the run has one) of every finished run
# under a sweep dir into OUT (same relative paths), for the committed results/<study>/runs/. A run is finished once
# it has published its model/ (a run still under way has a metrics.json without its last stages).
# Usage: scripts/collect_finished_runs.sh SWEEP_DIR OUT_DIR
set -euo pipefail
sweep=$1 out=$2
if [[ ! -d "$sweep" ]]; then
    echo "error: $sweep: no such sweep dir (nothing collected, $out left as it was)" >&2
    exit 1
fi
rm -rf "$out"
(cd "$sweep" && find . -name metrics.json -printf '%h\n') | sort | while read -r dir; do
    [[ -d "$sweep/$dir/model" ]] || continue
    mkdir -p "$out/$dir"
    cp "$sweep/$dir/metrics.json" "$sweep/$dir/.hydra/config.yaml" "$out/$dir/"
    if [[ -f "$sweep/$dir/trainer_log.jsonl" ]]; then cp "$sweep/$dir/trainer_log.jsonl" "$out/$dir/"; fi
done
