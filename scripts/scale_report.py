"""The scale study's tables and plot (scripts/scale_minilm_sst2.sh): CAP-f minus its no-contrast baseline, per
seed, as the number of updates per pruning step grows.

    python scripts/scale_report.py results/minilm-sst2-scale/runs --out results/minilm-sst2-scale

Reads the runs with cap.report's collector (so the same runs, splits and metrics), pairs each CAP-f run with the
baseline run (contrast.enabled=false) of the same training-set size, seed and sparsity, and writes
  table.csv  one row per (train_samples, sparsity, seed): both accuracies and the gap, in points
  gap.md     mean ± sample std of the gap over seeds, per size and sparsity
  gap.png    the gap vs updates per pruning step (log scale), one line per sparsity, seeds as dots
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from cap.report import collect_runs
from cap.studies import figure, fmt, markdown_table, mean_std

COLUMNS = ("train_samples", "updates_per_step", "sparsity", "seed", "cap_f", "baseline", "gap")


def pairs(records: list[dict], split: str = "validation", metric: str = "accuracy") -> list[dict]:
    """One row per (size, sparsity, seed) that has both a CAP-f ("full") and a baseline run; accuracies in %."""
    cells: dict[tuple, dict] = {}
    for r in records:
        if r["method"] != "cap_f" or r["split"] != split or r["metric"] != metric:
            continue
        config = r["config"]
        size = json.loads(config["data.max_train_samples"])
        batch, epochs = json.loads(config["trainer.batch_size"]), json.loads(config["prune.retrain_epochs"])
        key = (size, r["sparsity"], r["seed"])
        cell = cells.setdefault(key, {"updates_per_step": math.ceil(size / batch) * epochs})
        cell[r["ablation"]] = 100 * r["value"]
    rows = []
    for (size, sparsity, seed), cell in sorted(cells.items()):
        if "full" in cell and "baseline" in cell:
            rows.append({"train_samples": size, "updates_per_step": cell["updates_per_step"], "sparsity": sparsity,
                         "seed": seed, "cap_f": cell["full"], "baseline": cell["baseline"],
                         "gap": cell["full"] - cell["baseline"]})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["train_samples"], r["updates_per_step"], r["sparsity"]), []).append(r)
    out = []
    for (size, updates, sparsity), group in sorted(groups.items()):
        out.append({"train_samples": size, "updates_per_step": updates, "sparsity": sparsity, "n": len(group),
                    **{f"{k}_{s}": v for k in ("cap_f", "baseline", "gap")
                       for s, v in zip(("mean", "std"), mean_std(r[k] for r in group))}})
    return out


def to_markdown(rows: list[dict]) -> str:
    def cell(r, key, sign=""):
        return fmt(r[f"{key}_mean"], r[f"{key}_std"], sign)

    lines = markdown_table(["train sentences", "updates per step", "sparsity", "n", "CAP-f (%)", "baseline (%)",
                            "gap (points)"],
                           ([r["train_samples"], r["updates_per_step"], f"{r['sparsity']:g}", r["n"], cell(r, "cap_f"),
                             cell(r, "baseline"), cell(r, "gap", "+")] for r in rows))
    return "\n".join(lines + ["", "SST-2 dev accuracy; gap = CAP-f - baseline (no contrastive terms, same schedule), "
                              "mean ± sample std over seeds (n)."]) + "\n"


def plot(per_seed: list[dict], rows: list[dict], path: Path) -> None:
    from matplotlib.ticker import NullFormatter

    fig = figure(6, 4)
    ax = fig.subplots()
    for i, sparsity in enumerate(sorted({r["sparsity"] for r in rows})):
        mine = [r for r in rows if r["sparsity"] == sparsity]
        ax.errorbar([r["updates_per_step"] for r in mine], [r["gap_mean"] for r in mine], color=f"C{i}",
                    yerr=[r["gap_std"] or 0 for r in mine], marker="o", capsize=3, label=f"{sparsity:g} sparsity")
        seeds = [r for r in per_seed if r["sparsity"] == sparsity]
        ax.scatter([r["updates_per_step"] for r in seeds], [r["gap"] for r in seeds], color=f"C{i}", s=12, alpha=0.4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ticks = sorted({(r["updates_per_step"], r["train_samples"]) for r in rows})
    ax.set_xticks([u for u, _ in ticks], [f"{u}\n({n:,} sent.)" for u, n in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="updates per pruning step (log)", ylabel="CAP-f - baseline (points)",
           title="MiniLM / SST-2: contrastive terms vs training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    per_seed = pairs(collect_runs([args.runs]))
    rows = summary(per_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in per_seed)
    (args.out / "gap.md").write_text(to_markdown(rows))
    plot(per_seed, rows, args.out / "gap.png")
    print(f"scale study written to {args.out}/: table.csv, gap.md, gap.png ({len(per_seed)} paired runs)")
    return args.out


if __name__ == "__main__":
    main()
