#!/usr/bin/env bash
# The CPU-scale reproduction committed under results/minilm-sst2/ (preset experiment=minilm/sst2_reproduction):
# CAP-f vs the plain first-order baseline (contrast.enabled=false) at 50/70/90 %, and CAP-f without PrC, SnC or FiC,
# seeds 1-3: 15 runs, each of about the size of the quickstart's pruning (one shared teacher), then the paper-vs-ours
# table and plot. The runs' metrics.json and configs are kept in results/minilm-sst2/runs/, so that the table can be
# checked against them (tests/test_report.py) without running anything.
# Usage: scripts/reproduce_minilm_sst2.sh [sweep dir] [--report-only]
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=multiruns/minilm-sst2 report_only=false
for arg in "$@"; do
    if [[ "$arg" == --report-only ]]; then report_only=true; else sweep=$arg; fi
done
out=results/minilm-sst2
run() { python -m cap -m experiment=minilm/sst2_reproduction seed=1,2,3 hydra.sweep.dir="$sweep/$1" "${@:2}"; }
if ! $report_only; then
    run main contrast.enabled=true,false
    run no-prc contrast.prc=false
    run no-snc contrast.snc=false
    run no-fic contrast.fic=false
fi
rm -rf "$out/runs"
(cd "$sweep" && find . -name metrics.json -printf '%h\n') | sort | while read -r dir; do
    mkdir -p "$out/runs/$dir"
    cp "$sweep/$dir/metrics.json" "$sweep/$dir/.hydra/config.yaml" "$out/runs/$dir/"
done
python -m cap.report "$out/runs" --out "$out"
