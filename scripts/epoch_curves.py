"""Per-epoch curves of movement-pruning runs (CAP-m / CAP-soft): dev metric and sparsity after every epoch, one line
per run, coloured by ablation (CAP = "full", no contrastive terms = "baseline") and score granularity when it is not
the paper's element scores, so a collapse shows where it happens.

    python scripts/epoch_curves.py results/minilm-sst2-cap-soft-vs-soft/runs [more run folders] \
        --out results/minilm-sst2-cap-soft-vs-soft/epochs.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from cap.report import MOVEMENT, ablation, finished_runs
from cap.studies import figure


def curves(roots, split: str = "validation", metric: str = "accuracy") -> list[dict]:
    """One record per finished movement run under `roots`: its series (ablation label, and the score granularity when
    not element), seed, and per-epoch rows."""
    out = []
    for rows, config in (run for root in roots for run in finished_runs(Path(root))):
        cfg = OmegaConf.load(config)
        if cfg.method.name not in MOVEMENT:
            continue
        rows = [r for r in rows if r["split"] == split and metric in r]
        label, granularity = ablation(cfg), OmegaConf.select(cfg, "prune.granularity", default="element")
        out.append({"ablation": label, "granularity": granularity, "seed": cfg.seed,
                    "series": label + ("" if granularity == "element" else f", {granularity}"),
                    "epochs": [r["stage"] for r in rows], "metric": [100 * r[metric] for r in rows], "sparsity": [100 * r["sparsity"] for r in rows]})
    return sorted(out, key=lambda c: (c["ablation"] != "full", c["ablation"], c["granularity"] != "element",
                                      c["granularity"], c["seed"]))


def plot(runs: list[dict], path: Path, metric: str = "accuracy") -> Path:
    labels = list(dict.fromkeys(c["series"] for c in runs))
    fig = figure(10, 4)
    acc, spars = fig.subplots(1, 2)
    for c in runs:
        style = {"color": f"C{labels.index(c['series'])}", "marker": "o", "markersize": 3,
                 "label": f"{c['series']}, seed {c['seed']}"}
        acc.plot(c["epochs"], c["metric"], **style)
        spars.plot(c["epochs"], c["sparsity"], **style)
    acc.set(xlabel="epoch", ylabel=f"dev {metric} (%)", title=f"dev {metric} after each epoch")
    spars.set(xlabel="epoch", ylabel="sparsity (%)", title="sparsity after each epoch")
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="folders above movement run dirs")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    runs = curves(args.runs)
    if not runs:
        raise SystemExit(f"{' '.join(map(str, args.runs))}: no finished CAP-m / CAP-soft run (metrics.json + config)")
    return plot(runs, args.out)


if __name__ == "__main__":
    main()
