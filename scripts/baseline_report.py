"""Tables, choice and plots of the tuned soft-movement baseline study (scripts/tune_soft_movement_baseline.sh).

    python scripts/baseline_report.py results/minilm-sst2-soft-baseline/runs --out results/minilm-sst2-soft-baseline

Phase select (RUNS/select: soft movement over its grid, evaluated on the held-out training rows `trainval` only):
  selection.csv / .md  final-epoch trainval accuracy and final sparsity per setting, per seed and mean ± sample std
  choice.json          the setting the rule picks: among the settings whose final sparsity averages at least 0.89,
                       the highest trainval accuracy averaged over the seeds; only once the whole grid has run
Phase dev (RUNS/dev: the chosen baseline and CAP-soft, the dev set read once):
  dev.csv / .md        final-epoch dev accuracy and sparsity per arm (per seed, mean ± std) and CAP-soft minus the
                       baseline, paired by seed
  curves.png           the logged training curves (trainer_log.jsonl) of the arms side by side, seed 1: λ, the
                       threshold τ, sparsity, CE, KD, the contrastive terms, and dev accuracy per epoch
Phase mechanism (RUNS/mechanism: CAP-soft without one term or with one bank, and structured soft movement at the
chosen baseline's settings; dev, once per run):
  mechanism.md         each arm's dev accuracy (mean ± std) and sparsity, and minus the chosen baseline, paired by seed
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from cap.report import finished_runs
from cap.studies import figure, fmt_values, markdown_table, paired

REPO = Path(__file__).resolve().parents[1]
GRID = ("prune.score_lr", "ce.weight", "kd.weight")
CAP_SOFT_SCORE_LR = OmegaConf.load(REPO / "conf/experiment/minilm/sst2_cap_soft.yaml").prune.score_lr  # the preset
SETTINGS, SEEDS = 4, [1, 2]  # the grid of tune_soft_movement_baseline.sh: 2 score lrs x 2 loss balances, 2 seeds
MIN_SPARSITY = 0.89


def arm_of(cfg) -> str:
    """"CAP-soft", with what a mechanism arm changes in brackets ("CAP-soft (sup_weight=0)", "CAP-soft (PrC only)",
    "CAP-soft (score_lr=0.01)", "CAP-soft (reaches the weights only)"), or "soft movement <the grid's values>",
    "structured soft movement ..." with prune.granularity=structured."""
    c = cfg.contrast
    if c.enabled:
        changes = [f"{key}=0" for key in ("sup_weight", "unsup_weight") if c[key] == 0]
        banks = [name for name in ("prc", "snc", "fic") if c[name]]
        if len(banks) < 3:
            changes.append(" + ".join({"prc": "PrC", "snc": "SnC", "fic": "FiC"}[b] for b in banks) + " only")
        if cfg.prune.score_lr != CAP_SOFT_SCORE_LR:
            changes.append(f"score_lr={cfg.prune.score_lr}")
        if c.get("reaches", "both") != "both":
            changes.append(f"reaches the {c.reaches} only")
        return "CAP-soft" + (f" ({', '.join(changes)})" if changes else "")
    label = "soft movement " + " ".join(f"{key}={OmegaConf.select(cfg, key)}" for key in GRID)
    return ("structured " if cfg.prune.granularity != "element" else "") + label


def runs(root: Path) -> list[dict]:
    """One record per finished run under `root`: its arm, seed, final-epoch accuracy (%) and sparsity, its log."""
    out = []
    if not root.is_dir():
        return out
    for rows, config in finished_runs(root):
        cfg = OmegaConf.load(config)
        last = max(r["stage"] for r in rows)
        final = next(r for r in rows if r["stage"] == last)
        log = config.parent / "trainer_log.jsonl"
        out.append({"arm": arm_of(cfg), "seed": int(cfg.seed), "accuracy": 100 * final["accuracy"],
                    "sparsity": final["sparsity"], "split": final["split"],
                    "overrides": [f"{key}={OmegaConf.select(cfg, key)}" for key in GRID],
                    "epochs": [(r["stage"], 100 * r["accuracy"]) for r in rows],
                    "log": [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []})
    return out


def table(records: list[dict], path: Path, title: str) -> list[dict]:
    """Per arm: accuracy and sparsity per seed and mean ± std, written as CSV and markdown; returns the rows."""
    arms = sorted({r["arm"] for r in records})
    rows = []
    for arm in arms:
        mine = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        rows.append({"arm": arm, "seeds": [r["seed"] for r in mine],
                     "accuracy": [round(r["accuracy"], 2) for r in mine],
                     "sparsity": [round(r["sparsity"], 4) for r in mine],
                     "accuracy_mean_std": fmt_values(r["accuracy"] for r in mine),
                     "sparsity_mean": round(statistics.mean(r["sparsity"] for r in mine), 4),
                     "overrides": mine[0]["overrides"]})
    with path.with_suffix(".csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["arm", "seeds", "accuracy", "accuracy_mean_std", "sparsity", "sparsity_mean"])
        for row in rows:
            writer.writerow([row["arm"], row["seeds"], row["accuracy"], row["accuracy_mean_std"], row["sparsity"],
                             row["sparsity_mean"]])
    lines = [f"# {title}", ""] + markdown_table(
        ["arm", "seeds", "accuracy (%) per seed", "mean ± std", "final sparsity (mean)"],
        ([r["arm"], r["seeds"], r["accuracy"], r["accuracy_mean_std"], r["sparsity_mean"]] for r in rows))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return rows


def choose(rows: list[dict]) -> dict | None:
    """The rule: among the settings reaching the target (mean final sparsity >= MIN_SPARSITY), the highest mean
    trainval accuracy; None until every setting of the grid has run with every seed."""
    if len(rows) != SETTINGS or any(r["seeds"] != SEEDS for r in rows):
        return None
    eligible = [r for r in rows if r["sparsity_mean"] >= MIN_SPARSITY]
    if not eligible:
        return None
    best = max(eligible, key=lambda r: statistics.mean(r["accuracy"]))
    return {"arm": best["arm"], "overrides": best["overrides"], "seeds": best["seeds"],
            "trainval_accuracy_mean": round(statistics.mean(best["accuracy"]), 2),
            "rule": f"mean final sparsity >= {MIN_SPARSITY}, then the highest mean final-epoch trainval accuracy"}


def cap_minus_baseline(records: list[dict]) -> str | None:
    """CAP-soft minus the baseline, paired by seed, mean ± std (None without both arms)."""
    seeds, diffs = paired({r["seed"]: r["accuracy"] for r in records if r["arm"] == "CAP-soft"},
                          {r["seed"]: r["accuracy"] for r in records if r["arm"] != "CAP-soft"})
    if not seeds:
        return None
    return (f"CAP-soft minus the baseline, paired by seed {seeds}: {fmt_values(diffs)} points "
            f"({[round(d, 2) for d in diffs]})")


CURVES = [("prune_lambda", "λ"), ("prune_level", "threshold τ"), ("sparsity_entries", "sparsity"), ("loss_ce", "CE"),
          ("loss_kd", "KD"), ("contrast", "contrastive terms (PrC + FiC + SnC)")]
# where the contrastive gradient goes (cap.losses.gradient_balance): its norm over the task's, on each part apart
PULLS = [("pull_scores", "contrastive ÷ task gradient norm, scores"),
         ("pull_weights", "contrastive ÷ task gradient norm, weights"),
         ("grad_cosine_scores", "cosine(task, contrastive gradient), scores"),
         ("grad_cosine_weights", "cosine(task, contrastive gradient), weights")]


def curve(log: list[dict], key: str) -> list[tuple[int, float]]:
    def value(e):
        if key == "contrast":
            return sum(e.get(k, 0) for k in ("loss_prc", "loss_fic", "loss_snc"))
        if key.startswith("pull_"):
            part = key.removeprefix("pull_")
            task = e.get(f"grad_norm_task_{part}")
            return e[f"grad_norm_contrast_{part}"] / task if task else None
        return e.get(key)

    return [(e["update"], v) for e in log if "loss" in e and (v := value(e)) is not None]


def plot(records: list[dict], path: Path, title: str, curves=CURVES) -> None:
    seed1 = [r for r in records if r["seed"] == 1 and r["log"]]
    if not seed1:
        return
    panels = curves + [("accuracy", "dev accuracy (%) per epoch")]
    colors = {r["arm"]: f"C{i}" for i, r in enumerate(seed1)}  # an arm's colour is the same in every panel
    fig = figure(18, 3.5 * -(-(len(panels) + 1) // 4))
    axes = fig.subplots(-(-(len(panels) + 1) // 4), 4)
    for ax, (key, name) in zip(axes.flat, panels):
        for r in seed1:
            points = r["epochs"] if key == "accuracy" else curve(r["log"], key)
            if points:
                ax.plot(*zip(*points), label=r["arm"], color=colors[r["arm"]],
                        **({"marker": "o"} if key == "accuracy" else {}))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch" if key == "accuracy" else "update")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[len(panels) - 1].get_legend_handles_labels()  # the accuracy panel has every arm
    list(axes.flat)[-1].legend(handles, labels, fontsize=7, loc="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    selection = runs(a.runs / "select")
    if selection:
        rows = table(selection, a.out / "selection", "Phase select: soft movement on trainval (final epoch)")
        choice = choose(rows)
        if choice:
            (a.out / "choice.json").write_text(json.dumps(choice, indent=1) + "\n")
            print(f"choice: {choice['arm']} (trainval {choice['trainval_accuracy_mean']})")
    dev = runs(a.runs / "dev")
    if dev:
        table(dev, a.out / "dev", "Phase dev: CAP-soft and the chosen baseline on the dev set (final epoch)")
        if line := cap_minus_baseline(dev):
            with (a.out / "dev.md").open("a") as file:
                file.write(f"\n{line}\n")
            print(line)
        plot(dev, a.out / "curves.png", "seed 1: CAP-soft and the chosen soft-movement baseline")
    mechanism = runs(a.runs / "mechanism")
    if mechanism and dev:
        mechanism_table(mechanism, dev, a.out / "mechanism.md")
        plot(dev + mechanism, a.out / "mechanism.png", "seed 1: the mechanism arms beside CAP-soft and the baseline",
             CURVES[2:4] + CURVES[5:] + PULLS)


def mechanism_table(mechanism: list[dict], dev: list[dict], path: Path) -> None:
    """Phase mechanism (dev, read once per run): each arm beside CAP-soft and the chosen baseline of phase dev, and
    its accuracy minus the baseline's, paired by seed."""
    base_arm = next(r["arm"] for r in dev if r["arm"] != "CAP-soft")
    base = {r["seed"]: r["accuracy"] for r in dev if r["arm"] == base_arm}
    cap_soft = {r["seed"]: r["accuracy"] for r in dev if r["arm"] == "CAP-soft"}
    arms = ["CAP-soft"] + sorted({r["arm"] for r in mechanism})
    rows = []
    for arm in arms:
        mine = {r["seed"]: r for r in (dev if arm == "CAP-soft" else mechanism) if r["arm"] == arm}
        row = [arm, sorted(mine), fmt_values(r["accuracy"] for r in mine.values()),
               round(statistics.mean(r["sparsity"] for r in mine.values()), 4)]
        for against in (base, cap_soft if arm != "CAP-soft" else {}):
            seeds, diffs = paired({s: r["accuracy"] for s, r in mine.items()}, against)
            row.append(f"{fmt_values(diffs, sign='+')} ({seeds})" if diffs else "")
        rows.append(row)
    lines = [f"# Phase mechanism: which term, on the dev set (final epoch), against {base_arm}", ""]
    lines += markdown_table(["arm", "seeds", "accuracy (%) mean ± std", "final sparsity (mean)",
                             "minus the baseline, paired by seed (points)", "minus CAP-soft, paired (points)"], rows)
    lines += ["", f"The baseline: {fmt_values(base.values())} % over seeds {sorted(base)}.", ""]
    lines += pulls_table(mechanism)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


PHASES = [(0, 2, "epochs 1-2"), (2, 6, "epochs 3-6"), (6, 10, "epochs 7-10")]  # the preset's 10 epochs: dense (τ, λ
# at 0 until update 2W), pruning, the last pruning and the end


def pulls_table(records: list[dict]) -> list[str]:
    """Where each arm's contrastive gradient goes, from the logged balance (every 10 updates): per phase, the ratio of
    its norm to the task gradient's on the scores and on the weights, and their cosines, each the mean over the
    phase's logged updates, then over the seeds (arms run before the split was logged have no row)."""
    rows = []
    for arm in sorted({r["arm"] for r in records}):
        logs = [[e for e in r["log"] if "grad_norm_task_scores" in e] for r in records if r["arm"] == arm]
        logs = [log for log in logs if log]
        if not logs:
            continue
        row = [arm, len(logs)]
        for lo, hi, _ in PHASES:
            cells = []
            for key in ("pull_scores", "pull_weights", "grad_cosine_scores", "grad_cosine_weights"):
                per_seed = [statistics.mean(v for u, v in curve([e for e in log if lo < e["epoch"] <= hi], key))
                            for log in logs]
                cells.append(f"{statistics.mean(per_seed):.2f}")
            row.append(" / ".join(cells))
        rows.append(row)
    if not rows:
        return []
    lines = ["Where the contrastive gradient goes (the logged gradient balance; per phase: its norm over the task "
             "gradient's on the scores / on the weights, then the cosine between the two on the scores / on the "
             "weights; the mean over the logged updates, then over the seeds; with `contrast.reaches` the pull as "
             "computed, before it is withheld from one part):", ""]
    return lines + markdown_table(["arm", "seeds", *(name for _, _, name in PHASES)], rows)


if __name__ == "__main__":
    main()
