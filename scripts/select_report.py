"""Tables, choice and plot of the contrast-selection study (scripts/select_contrast_minilm_sst2.sh).

    python scripts/select_report.py results/minilm-sst2-select/runs --scale results/minilm-sst2-scale/runs \
        --out results/minilm-sst2-select

Phase 1 (RUNS/select: CAP-f candidates and the baseline, evaluated on the held-out training rows `trainval` only):
  selection.csv / .md  trainval accuracy per candidate and sparsity, mean ± sample std over seeds
  choice.json          the candidate the rule picks: the highest trainval accuracy averaged over sparsities and seeds,
                       among the CAP-f candidates (the baseline is the reference, not a candidate); only once every
                       candidate has the same seeds
Phase 2 (RUNS/dev: the chosen candidate on the dev set), read beside the scale study's runs of the same size
(CAP-f with the paper's settings and the baseline, same teacher, subset and seeds):
  dev.csv / .md        dev accuracy per setting and sparsity (mean ± std), and each setting minus the baseline,
                       paired by seed
  select.png           both, accuracy vs sparsity, one line per setting
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from cap.report import collect_runs
from cap.studies import figure, fmt, markdown_table, mean_std, paired

BASELINE = "baseline"
DEV_SIZE = 1000  # the training-set size of phase 2 (the scale study's smallest)


def candidate(config: dict) -> str:
    """A run's contrastive setting as the overrides that make it: "baseline" or "pooling=cls unsup_weight=0.3"."""
    if config.get("contrast.enabled", "true") == "false":
        return BASELINE
    return f"contrast.pooling={config.get('contrast.pooling', 'cls')} " \
           f"contrast.unsup_weight={config.get('contrast.unsup_weight', '0.3')}"


def accuracies(records: list[dict], split: str, size: int | None = None) -> dict[tuple, dict[int, float]]:
    """{(candidate, sparsity): {seed: accuracy in %}} of CAP-f records on `split` (of one training size if given)."""
    cells: dict[tuple, dict[int, float]] = {}
    for r in records:
        if r["method"] != "cap_f" or r["split"] != split or r["metric"] != "accuracy":
            continue
        if size is not None and json.loads(r["config"].get("data.max_train_samples", "null")) != size:
            continue
        cells.setdefault((candidate(r["config"]), r["sparsity"]), {})[r["seed"]] = 100 * r["value"]
    return cells


def table(cells: dict[tuple, dict[int, float]]) -> list[dict]:
    """One row per (setting, sparsity): mean ± std over seeds and, beside the baseline, the gap paired by seed."""
    rows = []
    for (name, sparsity), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][0] != BASELINE, kv[0])):
        _, gaps = paired(by_seed, cells.get((BASELINE, sparsity), {}))
        mean, std = mean_std(by_seed.values())
        gap_mean, gap_std = mean_std(gaps) if gaps and name != BASELINE else (None, None)
        rows.append({"setting": name, "sparsity": sparsity, "n": len(by_seed), "seeds": sorted(by_seed),
                     "mean": mean, "std": std, "gap_mean": gap_mean, "gap_std": gap_std})
    return rows


def choose(cells: dict[tuple, dict[int, float]]) -> dict | None:
    """The rule of phase 1: the CAP-f candidate with the highest accuracy averaged over its sparsities and seeds;
    None until every candidate (and the baseline) has the same seeds at every sparsity."""
    names, sparsities = {name for name, _ in cells}, {sparsity for _, sparsity in cells}
    seeds = {tuple(sorted(by_seed)) for by_seed in cells.values()}
    if len(seeds) != 1 or len(cells) != len(names) * len(sparsities):
        return None
    scores: dict[str, list[float]] = {}
    for (name, _), by_seed in cells.items():
        scores.setdefault(name, []).extend(by_seed.values())
    ranked = sorted(((statistics.mean(v), name) for name, v in scores.items() if name != BASELINE), reverse=True)
    if not ranked:
        return None
    best, name = ranked[0]
    return {"chosen": name.split(), "trainval_accuracy": best,
            "baseline_trainval_accuracy": statistics.mean(scores[BASELINE]) if BASELINE in scores else None,
            "ranking": [{"setting": n, "trainval_accuracy": s} for s, n in ranked], "seeds": list(seeds.pop()),
            "rule": "highest trainval accuracy averaged over sparsities and seeds, among the CAP-f candidates"}


def to_markdown(rows: list[dict], split: str, note: str) -> str:
    lines = markdown_table(["setting", "sparsity", "n", "accuracy (%)", "minus baseline (points)"], (
        [r["setting"], f"{r['sparsity']:g}", r["n"], fmt(r["mean"], r["std"]),
         "" if r["gap_mean"] is None else fmt(r["gap_mean"], r["gap_std"], "+")] for r in rows))
    return "\n".join(lines + ["", f"SST-2 {split} accuracy, mean ± sample std over seeds (n); minus baseline: "
                              f"paired by seed. {note}"]) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "seeds": " ".join(map(str, r["seeds"]))} for r in rows)


def plot(panels: list[tuple[str, list[dict]]], path: Path) -> None:
    """One panel per phase, accuracy vs sparsity; a setting has one colour in every panel, one legend below."""
    names = sorted({r["setting"] for _, rows in panels for r in rows}, key=lambda n: (n != BASELINE, n))
    fig = figure(5 * len(panels), 4.6)
    handles = {}
    for ax, (title, rows) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name in dict.fromkeys(r["setting"] for r in rows):
            series = [r for r in rows if r["setting"] == name]
            handles[name] = ax.errorbar([100 * r["sparsity"] for r in series], [r["mean"] for r in series],
                                        yerr=[r["std"] or 0 for r in series], marker="o", capsize=3,
                                        color=f"C{names.index(name)}", linestyle="--" if name == BASELINE else "-")
        ax.set(title=title, xlabel="sparsity (%)", ylabel="accuracy (%)")
    fig.legend([handles[n] for n in names], names, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08 + 0.035 * ((len(names) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="the study's runs/ (select/ and dev/ under it)")
    parser.add_argument("--scale", type=Path, required=True, help="the scale study's runs/ (phase 2's reference)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    panels = []

    selection = accuracies(collect_runs([args.runs / "select"]), "trainval")
    rows = table(selection)
    write_csv(rows, args.out / "selection.csv")
    (args.out / "selection.md").write_text(to_markdown(rows, "trainval", "Phase 1: held-out training rows, not dev."))
    panels.append(("phase 1: trainval (choosing)", rows))
    choice = choose(selection)
    if choice is not None:
        (args.out / "choice.json").write_text(json.dumps(choice, indent=2) + "\n")
        print("chosen:", " ".join(choice["chosen"]))

    if (args.runs / "dev").is_dir():
        dev = accuracies(collect_runs([args.runs / "dev", args.scale]), "validation", DEV_SIZE)
        rows = table(dev)
        write_csv(rows, args.out / "dev.csv")
        (args.out / "dev.md").write_text(to_markdown(
            rows, "dev", f"Phase 2, {DEV_SIZE} training sentences: the chosen setting's runs and the scale "
            "study's CAP-f (paper settings) and baseline runs of that size."))
        panels.append(("phase 2: dev (reported once)", rows))
    plot(panels, args.out / "select.png")
    return args.out


if __name__ == "__main__":
    main()
