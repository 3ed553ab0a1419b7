"""The scale study's tables and plot (scripts/scale_minilm_sst2.sh, scripts/scale_up_minilm_sst2.sh): each CAP-f
setting minus its no-contrast baseline, per seed, as the number of updates per pruning step grows.

    python scripts/scale_report.py results/minilm-sst2-scale/runs results/minilm-sst2-select/runs/dev \
        --out results/minilm-sst2-scale

Reads the runs under every folder given with cap.report's collector (so the same runs, splits and metrics): the
selection study's dev runs of its choice pair with the scale study's 1,000-sentence baseline (same subset, teacher,
path and seeds). A run's arm is the baseline
(contrast.enabled=false) or CAP-f labelled by its pooling and unsupervised weight ("CAP-f (cls, unsup 0.3)": the
paper's settings; "CAP-f (auto, unsup 0.03)": the selection study's choice); its path is its precision and batching
(the scale study ran fp32 with random batches, the scale-up the defaults: the precision `trainer.precision=auto`
resolved to, length-grouped batches), so runs of one size on different paths are never averaged together. Each CAP-f run is paired with the
baseline run of the same size, path, seed and sparsity. Writes
  table.csv  one row per (train_samples, path, arm, sparsity, seed): both accuracies and the gap, in points
  gap.md     mean ± sample std of the gap over seeds (n per cell), per size, path, arm and sparsity
  gap.png    the gap vs updates per pruning step (log scale), one panel per arm, one line per sparsity and path,
             error bars the std over seeds, seeds as dots, the paper's budget marked
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from cap.report import collect_runs
from cap.studies import figure, fmt, markdown_table, mean_std

COLUMNS = ("train_samples", "updates_per_step", "path", "arm", "sparsity", "seed", "accuracy", "baseline", "gap")
# the paper's budget per pruning step on SST-2: 67,349 sentences, batch 16, 2 epochs per 10 % step (cap-spec.md)
PAPER_UPDATES_PER_STEP = math.ceil(67349 / 16) * 2


def arm(record: dict) -> str:
    """"baseline", or CAP-f with its pooling and unsupervised weight as its config has them."""
    if record["ablation"] == "baseline":
        return "baseline"
    config = record["config"]  # cap.report.run_settings: strings as they are, numbers as JSON text
    pooling, unsup = config.get("contrast.pooling"), json.loads(config.get("contrast.unsup_weight", "null"))
    switched_off = [label for label in record["ablation"].split(",") if label != "full" and
                    not label.startswith("pool=")]  # the pooling is named below
    return " ".join(["CAP-f", *switched_off, f"({pooling}, unsup {unsup:g})"])


def path(config: dict) -> str:
    """The run's precision and batching: "fp32" (the scale study's runs) or e.g. "bf16, length-grouped"."""
    grouped = config.get("data.group_by_length", "false") == "true"
    return config.get("trainer.precision", "fp32") + (", length-grouped" if grouped else "")


def pairs(records: list[dict], split: str = "validation", metric: str = "accuracy") -> list[dict]:
    """One row per CAP-f run (size, path, arm, sparsity, seed) whose baseline ran too; accuracies in %."""
    cells: dict[tuple, dict] = {}
    for r in records:
        if r["method"] != "cap_f" or r["split"] != split or r["metric"] != metric:
            continue
        config = r["config"]
        size = json.loads(config["data.max_train_samples"])
        batch, epochs = json.loads(config["trainer.batch_size"]), json.loads(config["prune.retrain_epochs"])
        key = (size, path(config), r["sparsity"], r["seed"])
        cell = cells.setdefault(key, {"updates_per_step": math.ceil(size / batch) * epochs, "arms": {}})
        name = arm(r)
        if name in cell["arms"]:
            raise SystemExit(f"two {name} runs at {size} sentences, {key[1]}, sparsity {key[2]}, seed {key[3]}: "
                             "give each run once (the same study under two folders?)")
        cell["arms"][name] = 100 * r["value"]
    rows = []
    for (size, run_path, sparsity, seed), cell in sorted(cells.items()):
        baseline = cell["arms"].pop("baseline", None)
        for name, accuracy in sorted(cell["arms"].items()) if baseline is not None else ():
            rows.append({"train_samples": size, "updates_per_step": cell["updates_per_step"], "path": run_path,
                         "arm": name, "sparsity": sparsity, "seed": seed, "accuracy": accuracy,
                         "baseline": baseline, "gap": accuracy - baseline})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["train_samples"], r["updates_per_step"], r["path"], r["arm"], r["sparsity"]),
                          []).append(r)
    out = []
    for (size, updates, run_path, name, sparsity), group in sorted(groups.items()):
        out.append({"train_samples": size, "updates_per_step": updates, "path": run_path, "arm": name,
                    "sparsity": sparsity, "n": len(group),
                    **{f"{k}_{s}": v for k in ("accuracy", "baseline", "gap")
                       for s, v in zip(("mean", "std"), mean_std(r[k] for r in group))}})
    return out


def to_markdown(rows: list[dict]) -> str:
    def cell(r, key, sign=""):
        return fmt(r[f"{key}_mean"], r[f"{key}_std"], sign)

    lines = markdown_table(["train sentences", "updates per step", "path", "arm", "sparsity", "n", "arm (%)",
                            "baseline (%)", "gap (points)"],
                           ([r["train_samples"], r["updates_per_step"], r["path"], r["arm"], f"{r['sparsity']:g}",
                             r["n"], cell(r, "accuracy"), cell(r, "baseline"), cell(r, "gap", "+")] for r in rows))
    return "\n".join(lines + [
        "", "SST-2 dev accuracy; gap = the arm - the baseline (no contrastive terms, same schedule, same path), "
        "mean ± sample std over seeds (n). Path: the run's precision and batching (fp32: the scale and selection "
        "studies' runs; "
        "bf16 or fp32 with length-grouped batches: the scale-up's defaults, the teacher's outputs cached). "
        f"The paper's budget: about {PAPER_UPDATES_PER_STEP:,} updates per pruning step."]) + "\n"


def plot(per_seed: list[dict], rows: list[dict], path_png: Path) -> None:
    from matplotlib.ticker import NullFormatter

    arms = sorted({r["arm"] for r in rows})
    paths = sorted({r["path"] for r in rows})
    sparsities = sorted({r["sparsity"] for r in rows})
    fig = figure(6 * len(arms), 4.2)
    axes = fig.subplots(1, len(arms), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, arms):
        for i, sparsity in enumerate(sparsities):
            for j, run_path in enumerate(paths):
                mine = [r for r in rows if (r["arm"], r["sparsity"], r["path"]) == (name, sparsity, run_path)]
                if not mine:
                    continue
                ax.errorbar([r["updates_per_step"] for r in mine], [r["gap_mean"] for r in mine], color=f"C{i}",
                            yerr=[r["gap_std"] or 0 for r in mine], marker="os^"[j % 3], capsize=3,
                            linestyle=["-", "--", ":"][j % 3], label=f"{sparsity:g} sparsity, {run_path}")
                seeds = [r for r in per_seed if (r["arm"], r["sparsity"], r["path"]) == (name, sparsity, run_path)]
                ax.scatter([r["updates_per_step"] for r in seeds], [r["gap"] for r in seeds], color=f"C{i}", s=12,
                           alpha=0.4)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axvline(PAPER_UPDATES_PER_STEP, color="grey", linestyle=":", linewidth=1.2)
        ax.text(PAPER_UPDATES_PER_STEP, 0.02, " the paper's budget", rotation=90, fontsize=7, color="grey",
                transform=ax.get_xaxis_transform(), ha="right", va="bottom")
        ax.set_xscale("log")
        ticks = sorted({(r["updates_per_step"], r["train_samples"]) for r in rows if r["arm"] == name})
        ax.set_xticks([u for u, _ in ticks], [f"{u}\n({n:,} sent.)" for u, n in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="updates per pruning step (log)", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("arm - baseline (points)")
    fig.suptitle("MiniLM / SST-2: contrastive terms vs training budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="folders of runs (searched recursively)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    per_seed = pairs(collect_runs(args.runs))
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
