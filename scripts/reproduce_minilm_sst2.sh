#!/usr/bin/env bash
# The CPU-scale reproduction committed under results/minilm-sst2/ (preset experiment=minilm/sst2_reproduction):
# CAP-f vs the plain first-order baseline (contrast.enabled=false) at 50/70/90 %, and CAP-f without PrC, SnC or FiC,
# seeds 1-3: 15 runs, each of about the size of the quickstart's pruning (one shared teacher), then the paper-vs-ours table
# and plot.  Usage: scripts/reproduce_minilm_sst2.sh [sweep dir]
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=${1:-multiruns/minilm-sst2}
run() { python -m cap -m experiment=minilm/sst2_reproduction seed=1,2,3 hydra.sweep.dir="$sweep/$1" "${@:2}"; }
run main contrast.enabled=true,false
run no-prc contrast.prc=false
run no-snc contrast.snc=false
run no-fic contrast.fic=false
python -m cap.report "$sweep" --out results/minilm-sst2
