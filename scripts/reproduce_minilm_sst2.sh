#!/usr/bin/env bash
# The CPU-scale reproduction committed under results/minilm-sst2/ (preset experiment=minilm/sst2_reproduction):
# CAP-f vs the plain first-order baseline (contrast.enabled=false) at 50/70/90 %, and CAP-f without PrC, SnC or FiC,
# seeds 1-3: 15 runs, each of about the size of the quickstart's pruning (one shared teacher), then the paper-vs-ours
# table and plot. The runs' metrics.json and configs are kept in results/minilm-sst2/runs/, so that the table can be
# checked against them (tests/test_report.py) without running anything.
# Usage: scripts/reproduce_minilm_sst2.sh [work dir, default multiruns/minilm-sst2] [--report-only: the table and
#        plot from the committed runs]
set -euo pipefail
STUDY=minilm-sst2
source "$(dirname "$0")/study.sh" "$@"
run() { (cd "$repo" && python -m cap -m experiment=minilm/sst2_reproduction seed=1,2,3 hydra.sweep.dir="$work/$1" "${@:2}"); }
if ! $report_only; then
    run main contrast.enabled=true,false
    run no-prc contrast.prc=false
    run no-snc contrast.snc=false
    run no-fic contrast.fic=false
    collect "$work" "$out/runs"
fi
python -m cap.report "$out/runs" --out "$out"
